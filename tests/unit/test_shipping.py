"""How task functions travel to other processes, and the remote context's round trip.

Each case pickles what :class:`Shipper` plans and unpickles it the way a
worker does; "a worker that cannot import the module" is simulated by
taking the module out of ``sys.modules`` before unpickling.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import pickle
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeopt import ExecutionContext, NotPicklableError, Pipeline, TaskContext
from pipeopt.batching import AdaptiveBatcher
from pipeopt.executors.remote import RemoteContext, RemoteOutcome
from pipeopt.executors.shipping import ByValue, Shipper, TaskFunction, describe_unpicklable

DECORATED = Pipeline("decorated")


@DECORATED.task
def decorated(x: int = 1) -> int:
    """A decorated module-level function: its name is bound to a PipelineTask."""
    return x + 1


def plain(x: int = 1) -> int:
    """A module-level function: workers import it by name."""
    return x * 2


def round_trip(shipped: Any) -> Any:
    return pickle.loads(pickle.dumps(shipped))


@pytest.fixture
def shipper() -> Shipper:
    return Shipper(main_importable=False)


def test_a_module_level_function_goes_by_reference(shipper: Shipper) -> None:
    assert shipper.plan("t", plain) is plain
    partial = functools.partial(plain, 3)
    assert shipper.plan("t", partial) is partial


def test_a_decorated_function_goes_by_reference_through_its_task(shipper: Shipper) -> None:
    shipped = shipper.plan("t", decorated.func)
    assert isinstance(shipped, TaskFunction)
    assert round_trip(shipped) is decorated.func
    assert shipped(x=4) == 5


def test_closures_made_in_a_loop_share_one_template(shipper: Shipper) -> None:
    def make(k: int) -> Any:
        def body(scale: int = 10) -> int:
            return k * scale

        return body

    bodies = [make(k) for k in range(3)]
    shipped = [shipper.plan(f"t{k}", body) for k, body in enumerate(bodies)]
    assert all(isinstance(s, ByValue) for s in shipped)
    assert len({id(s.template) for s in shipped}) == 1  # pickled once
    assert [round_trip(s)() for s in shipped] == [0, 10, 20]
    assert [s(scale=1) for s in shipped] == [0, 1, 2]  # in-process use, no pickling


def test_lambdas_and_partials_of_them_go_by_value(shipper: Shipper) -> None:
    offset = 5
    shipped = shipper.plan("t", functools.partial(lambda a, b: a + b + offset, 1))
    assert isinstance(shipped, functools.partial)
    assert isinstance(shipped.func, ByValue)
    assert round_trip(shipped)(2) == 8


@pytest.fixture
def run_file(tmp_path: Path) -> Iterator[str]:
    """A file loaded by path, as ``pipeopt run`` loads one; yields its module name."""
    path = tmp_path / "flow.py"
    path.write_text(
        "from pipeopt import Pipeline, PipelineTask\n"
        "pipeline = Pipeline('flow')\n"
        "FACTOR = 3\n"
        "def helper(x):\n    return x * FACTOR\n"
        "def added(x=2):\n    return helper(x)\n"
        "pipeline.add(PipelineTask('added', added))\n"
    )
    name = "_pipeopt_user_test_shipping"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield name
    sys.modules.pop(name, None)


def test_functions_of_a_file_loaded_by_path_go_by_value(shipper: Shipper, run_file: str) -> None:
    func = sys.modules[run_file].added
    shipped = shipper.plan("added", func)
    assert isinstance(shipped, ByValue)
    assert run_file in shipper.local_modules
    data = pickle.dumps(shipped)
    del sys.modules[run_file]  # a worker has never heard of the module
    assert pickle.loads(data)() == 6


class _Holder:
    def __init__(self) -> None:
        self.lock = threading.Lock()


def test_the_object_that_cannot_cross_is_named(shipper: Shipper) -> None:
    holder = _Holder()
    with pytest.raises(NotPicklableError) as caught:
        shipper.plan("hold", functools.partial(plain, holder))
    assert caught.value.task == "hold"
    assert caught.value.reason == describe_unpicklable(functools.partial(plain, holder))
    assert "attribute 'lock' of argument 0 of the partial is a _thread.lock" in str(caught.value)


def test_the_remote_context_round_trip_reaches_the_driver(
    caplog: pytest.LogCaptureFixture,
) -> None:
    batcher = AdaptiveBatcher(0.1, initial_size=40)
    observed: list[tuple[str, int, float]] = []
    driver = ExecutionContext(
        "load",
        attempt=2,
        run_id="r1",
        dependencies=("src",),
        results={"src": [1, 2]},
        batcher=batcher,
        batch_observer=lambda task, size, latency: observed.append((task, size, latency)),
    )
    remote: TaskContext = round_trip(RemoteContext.from_context(driver))
    assert isinstance(remote, TaskContext)
    assert (remote.task, remote.attempt, remote.run_id) == ("load", 2, "r1")
    assert remote.upstream == {"src": [1, 2]}
    assert remote.plan_batch(100) == 40  # answered by a copy of the driver's batcher
    assert remote.cancelled is False
    remote.record_batch(40, 0.01)
    remote.record_custom_metric("rows", 40)
    remote.logger.warning("slow %s", "sink")
    assert isinstance(remote, RemoteContext)
    outcome: RemoteOutcome = round_trip(remote.outcome())
    with caplog.at_level(logging.INFO, logger="pipeopt.task"):
        outcome.replay(driver)
    assert observed == [("load", 40, 0.01)]
    assert batcher.statistics().batches == 1
    assert [r.getMessage() for r in caplog.records] == ["[load #2] slow sink"]
