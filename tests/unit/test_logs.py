"""Each task's log records are captured into its outcome, bounded, per executor."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pipeopt import Pipeline, PipelineOptimizer, TaskState
from pipeopt.logs import DEFAULT_LIMIT

_plain = logging.getLogger("tests.userjob")


def chatty(context: Any) -> int:
    context.logger.info("reading %s", "a.csv")
    _plain.warning("plain logger, no context")
    return 1


async def chatty_async(context: Any) -> int:
    context.logger.info("awaiting the api")
    return 2


def noisy(context: Any) -> None:
    for k in range(DEFAULT_LIMIT + 50):
        context.logger.info("row %d", k)


def broken(context: Any) -> None:
    context.logger.error("about to fail on attempt %d", context.attempt)
    raise ValueError("bad input")


@pytest.mark.parametrize("executor", ["thread", "sync", "async"])
def test_records_of_each_body_land_in_its_own_outcome(executor: str) -> None:
    p = Pipeline("logs")
    p.task(name="chatty")(chatty)
    p.task(name="chatty_async")(chatty_async)
    p.task(name="quiet")(lambda: 3)
    result = PipelineOptimizer(max_workers=2, executor=executor).run(p)
    assert result.ok
    logs = result.tasks["chatty"].logs
    assert len(logs) == 2
    assert logs[0].endswith("INFO pipeopt.task: [chatty #1] reading a.csv")
    assert logs[1].endswith("WARNING tests.userjob: plain logger, no context")
    assert [line.split(" ", 2)[2] for line in result.tasks["chatty_async"].logs] == [
        "INFO pipeopt.task: [chatty_async #1] awaiting the api"
    ]
    assert result.tasks["quiet"].logs == []
    assert result.to_dict()["tasks"]["chatty"]["logs"] == logs


def test_logs_are_bounded_per_task_with_a_note() -> None:
    p = Pipeline("noisy")
    p.task(name="noisy")(noisy)
    result = PipelineOptimizer(max_workers=1).run(p)
    logs = result.tasks["noisy"].logs
    assert len(logs) == DEFAULT_LIMIT + 1
    assert logs[-1] == f"[50 more log records not kept: limit {DEFAULT_LIMIT}]"
    assert logs[0].endswith("row 0")


def test_failed_attempts_keep_their_logs_and_tracebacks() -> None:
    from pipeopt import RetryPolicy

    p = Pipeline("broken")
    p.task(name="broken", retry_policy=RetryPolicy(max_attempts=2, base_delay=0.0, jitter=0.0))(
        broken
    )
    result = PipelineOptimizer(max_workers=1).run(p)
    outcome = result.tasks["broken"]
    assert outcome.state is TaskState.FAILED
    assert [line.split(": ", 1)[1] for line in outcome.logs] == [
        "[broken #1] about to fail on attempt 1",
        "[broken #2] about to fail on attempt 2",
    ]
    texts = [a.traceback for a in outcome.attempt_history]
    assert all(t is not None and "ValueError: bad input" in t for t in texts)


def test_the_root_logger_is_left_as_it_was() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    p = Pipeline("restore")
    p.task(name="chatty")(chatty)
    PipelineOptimizer(max_workers=1).run(p)
    assert root.handlers == before
    assert logging.getLogger("pipeopt.task").level == logging.NOTSET
