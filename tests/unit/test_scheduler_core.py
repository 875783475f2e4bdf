"""`SchedulerCore` on its own: no threads, no executor, a fake clock.

Each test drives the state machine the way the run loop does (``start``,
``next_task``, ``succeed``/``fail``, ``stop``) and checks the states, the
order of dispatch and the counters after each step.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeopt import (
    CircuitBreaker,
    CircuitOpenError,
    Pipeline,
    PipelineTask,
    RetryPolicy,
    TaskState,
    UpstreamFailedError,
)
from pipeopt.result import AttemptRecord
from pipeopt.scheduler import SchedulerCore


def noop() -> None:
    """A body that is never called: these tests run no bodies."""


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Driver:
    """Drive a :class:`SchedulerCore` by task name, as the run loop would, in one thread."""

    def __init__(self, pipeline: Pipeline, clock: Clock | None = None, **options: Any) -> None:
        self.clock = clock if clock is not None else Clock()
        self.core = SchedulerCore(
            pipeline.compile(), clock=self.clock, rng=random.Random(7), **options
        )

    def i(self, name: str) -> int:
        return self.core.compiled.index[name]

    def state(self, name: str) -> TaskState:
        return self.core.outcomes[self.i(name)].state

    def take(self) -> str | None:
        """Return the next task the scheduler dispatches now, or ``None``."""
        i = self.core.next_task(self.clock.now)
        return None if i is None else self.core.outcomes[i].name

    def take_all(self) -> list[str]:
        """Dispatch every ready task, in order, as idle workers would."""
        taken = []
        while (name := self.take()) is not None:
            taken.append(name)
        return taken

    def succeed(self, name: str, value: Any = None) -> int:
        i = self.i(name)
        number = self.core.outcomes[i].attempts
        return self.core.succeed(i, value, AttemptRecord(number, 1000.0, 0.5))

    def fail(self, name: str, error: BaseException | None = None) -> bool:
        i = self.i(name)
        error = error if error is not None else RuntimeError(f"{name} broke")
        record = AttemptRecord(self.core.outcomes[i].attempts, 1000.0, 0.5, error, "traceback")
        return self.core.fail(i, error, record, self.clock.now)


def pipeline_of(*tasks: PipelineTask) -> Pipeline:
    pipeline = Pipeline("core")
    for task in tasks:
        pipeline.add(task)
    return pipeline


def task(name: str, *deps: str, **options: Any) -> PipelineTask:
    return PipelineTask(name, noop, dependencies=deps, **options)


# -- readiness ---------------------------------------------------------------


def test_a_task_is_ready_only_when_every_dependency_succeeded() -> None:
    run = Driver(pipeline_of(task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c")))
    run.core.start()
    assert [run.state(n) for n in "abcd"] == [TaskState.READY] + [TaskState.PENDING] * 3
    assert run.take_all() == ["a"]
    assert run.state("a") is TaskState.RUNNING
    assert run.core.active == 1
    assert run.take() is None  # nothing else is ready while a runs

    assert run.succeed("a", 1) == 2
    assert run.core.results == {"a": 1}
    assert run.take() == "b"
    assert run.succeed("b") == 0  # d still waits on c
    assert run.state("d") is TaskState.PENDING
    assert run.take_all() == ["c"]
    assert run.succeed("c") == 1
    assert run.take_all() == ["d"]
    run.succeed("d", "done")
    assert run.core.done
    assert run.core.finished == run.core.total == 4
    assert run.core.active == 0
    assert [run.core.outcomes[i].name for i in run.core.completed] == ["a", "b", "c", "d"]


def test_nothing_is_dispatched_before_start() -> None:
    run = Driver(pipeline_of(task("a")))
    assert run.take() is None
    assert run.state("a") is TaskState.PENDING


# -- ordering ------------------------------------------------------------------


def test_ready_tasks_leave_by_criticality_first() -> None:
    labels = ["low", "blocker", "deferred", "medium", "critical", "high"]
    run = Driver(pipeline_of(*(task(label, criticality=label) for label in labels)))
    run.core.start()
    assert run.core.critical_backlog == 2
    assert run.take_all() == ["blocker", "critical", "high", "medium", "low", "deferred"]
    assert run.core.critical_backlog == 0


def test_a_task_inherits_the_criticality_of_what_waits_on_it() -> None:
    run = Driver(
        pipeline_of(
            task("extract", criticality="low"),
            task("other", criticality="high"),
            task("report", "extract", criticality="blocker"),
        )
    )
    run.core.start()
    assert run.core.outcomes[run.i("extract")].criticality == "blocker"
    assert run.take_all() == ["extract", "other"]


def test_among_peers_the_longer_remaining_critical_path_goes_first() -> None:
    run = Driver(
        pipeline_of(
            task("short"),
            task("long"),
            task("long-tail", "long", expected_duration=30.0),
            task("mid"),
            task("mid-tail", "mid", expected_duration=5.0),
        )
    )
    run.core.start()
    assert run.take_all() == ["long", "mid", "short"]


def test_equal_peers_leave_first_in_first_out() -> None:
    names = [f"t{n}" for n in range(12)]
    random.Random(3).shuffle(names)
    run = Driver(pipeline_of(*(task(name) for name in names)))
    run.core.start()
    assert run.take_all() == names


def test_tasks_woken_later_queue_behind_equal_peers_woken_earlier() -> None:
    run = Driver(pipeline_of(task("a"), task("b"), task("x", "a"), task("y", "b")))
    run.core.start()
    assert run.take_all() == ["a", "b"]
    run.succeed("b")
    run.succeed("a")
    assert run.take_all() == ["y", "x"]


# -- aging -----------------------------------------------------------------


def test_waiting_ages_a_deferred_task_past_a_stream_of_critical_work() -> None:
    tasks = [task("old", criticality="deferred")]
    tasks += [task(f"c{n}", criticality="critical") for n in range(10)]
    run = Driver(pipeline_of(*tasks), aging_interval=1.0)
    run.core.start()
    assert run.take() == "c0"
    run.clock.now = 3.9  # deferred (5) ages three levels to high (2): critical still wins
    assert run.take() == "c1"
    run.clock.now = 4.0  # ... four levels: it ties with critical and, older, goes first
    assert run.take() == "old"
    assert run.take() == "c2"


def test_waiting_ages_a_task_past_blockers_with_longer_critical_paths() -> None:
    tasks = [task("old", criticality="deferred", expected_duration=0.1)]
    tasks += [task(f"b{n}", criticality="blocker", expected_duration=60.0) for n in range(10)]
    run = Driver(pipeline_of(*tasks), aging_interval=1.0)
    run.core.start()
    assert run.take() == "b0"
    run.clock.now = 5.9  # deferred (5) ages five levels to blocker: the longer path still wins
    assert run.take() == "b1"
    run.clock.now = 6.0  # a sixth interval ranks it above any blocker that just arrived
    assert run.take() == "old"
    assert run.take() == "b2"


def test_without_aging_priority_is_strict() -> None:
    tasks = [task("old", criticality="deferred")]
    tasks += [task(f"c{n}", criticality="critical") for n in range(3)]
    run = Driver(pipeline_of(*tasks), aging_interval=None)
    run.core.start()
    run.clock.now = 1e6
    assert run.take_all() == ["c0", "c1", "c2", "old"]


# -- retries: parked, not sleeping -----------------------------------------


def test_a_failed_attempt_is_parked_until_its_backoff_is_due() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=2.0, multiplier=2.0, jitter=0.0)
    run = Driver(pipeline_of(task("flaky", retry_policy=policy), task("other")))
    run.core.start()
    assert run.take() == "flaky"

    run.clock.now = 10.0
    assert run.fail("flaky") is True
    assert run.state("flaky") is TaskState.RETRYING
    assert run.core.active == 0  # no worker is held while it waits
    assert run.core.retries_total == 1
    assert run.core.next_due() == 12.0
    assert run.take_all() == ["other"]  # the rest goes on meanwhile

    run.clock.now = 11.999
    assert run.take() is None
    run.clock.now = 12.0
    assert run.take() == "flaky"
    assert run.core.outcomes[run.i("flaky")].attempts == 2
    assert run.fail("flaky") is True
    assert run.core.next_due() == 16.0  # 12 + 2 * 2

    run.clock.now = 16.0
    assert run.take() == "flaky"
    run.succeed("flaky", "ok")
    outcome = run.core.outcomes[run.i("flaky")]
    assert outcome.state is TaskState.SUCCEEDED
    assert outcome.error is None  # an earlier attempt's error does not stick
    assert outcome.attempts == 3
    assert len(outcome.attempt_history) == 3
    assert run.core.failures_total == 0


def test_release_due_moves_only_due_tasks() -> None:
    policy = RetryPolicy(max_attempts=2, base_delay=1.0, jitter=0.0)
    run = Driver(pipeline_of(task("a", retry_policy=policy)))
    run.core.start()
    run.take()
    run.fail("a")
    assert run.core.release_due(0.5) == 0
    assert run.core.ready_count == 0
    assert run.core.release_due(1.0) == 1
    assert run.state("a") is TaskState.READY


def test_a_task_out_of_attempts_fails_and_only_its_descendants_are_skipped() -> None:
    policy = RetryPolicy(max_attempts=2, base_delay=1.0, jitter=0.0)
    run = Driver(
        pipeline_of(
            task("bad", retry_policy=policy),
            task("child", "bad"),
            task("grandchild", "child"),
            task("side"),
            task("joined", "side", "bad"),
        )
    )
    run.core.start()
    assert run.take_all() == ["bad", "side"]
    run.fail("bad")
    run.clock.now = 1.0
    assert run.take() == "bad"
    error = ValueError("still broken")
    assert run.fail("bad", error) is False

    bad = run.core.outcomes[run.i("bad")]
    assert bad.state is TaskState.FAILED
    assert bad.error is error
    assert bad.traceback == "traceback"
    for name in ("child", "grandchild", "joined"):
        outcome = run.core.outcomes[run.i(name)]
        assert outcome.state is TaskState.SKIPPED
        assert isinstance(outcome.error, UpstreamFailedError)
    assert run.state("side") is TaskState.RUNNING  # an independent branch goes on
    assert run.core.failures_total == 1
    assert not run.core.done
    run.succeed("side")
    assert run.core.done
    assert run.take() is None


def test_a_non_retryable_error_fails_at_once() -> None:
    policy = RetryPolicy(max_attempts=5, retry_on=(ConnectionError,))
    run = Driver(pipeline_of(task("a", retry_policy=policy)))
    run.core.start()
    run.take()
    assert run.fail("a", KeyError("nope")) is False
    assert run.state("a") is TaskState.FAILED
    assert run.core.retries_total == 0


# -- circuit breakers: parked, not sleeping ---------------------------------


def test_an_open_breaker_parks_a_retryable_task_until_it_half_opens() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=10.0, clock=clock)
    policy = RetryPolicy(max_attempts=3, jitter=0.0)
    run = Driver(
        pipeline_of(
            task("first", circuit_breaker=breaker),
            task("second", circuit_breaker=breaker, retry_policy=policy),
        ),
        clock,
    )
    run.core.start()
    assert run.take() == "first"
    run.fail("first")  # one failure opens the breaker
    assert breaker.statistics().state.name == "OPEN"

    assert run.take() is None  # refused: parked, not run and not failed
    assert run.state("second") is TaskState.RETRYING
    assert run.core.outcomes[run.i("second")].attempts == 0
    assert run.core.breaker_rejections == 1
    assert run.core.next_due() == 10.0

    run.clock.now = 10.0
    assert run.take() == "second"  # the half-open trial
    run.succeed("second")
    assert breaker.statistics().state.name == "CLOSED"
    assert run.core.done


def test_an_open_breaker_fails_a_task_without_retries_at_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=10.0, clock=clock)
    run = Driver(
        pipeline_of(
            task("first", circuit_breaker=breaker, criticality="high"),
            task("second", circuit_breaker=breaker),
            task("after", "second"),
        ),
        clock,
    )
    run.core.start()
    run.take()
    run.fail("first")
    assert run.take() is None
    second = run.core.outcomes[run.i("second")]
    assert second.state is TaskState.FAILED
    assert isinstance(second.error, CircuitOpenError)
    assert second.attempts == 0
    assert run.state("after") is TaskState.SKIPPED
    assert run.core.done


# -- fail_fast and stop --------------------------------------------------------


def test_fail_fast_cancels_everything_not_started() -> None:
    run = Driver(
        pipeline_of(task("a"), task("b"), task("c"), task("d", "a")),
        fail_fast=True,
    )
    run.core.start()
    assert run.take() == "a"
    assert run.take() == "b"
    run.fail("a")
    assert run.core.stopped
    assert run.state("a") is TaskState.FAILED
    assert run.state("d") is TaskState.SKIPPED
    assert run.state("c") is TaskState.CANCELLED
    assert run.state("b") is TaskState.RUNNING  # running work is the driver's to stop
    assert run.take() is None
    run.succeed("b")
    assert run.core.done


def test_without_fail_fast_the_other_branches_run_on() -> None:
    run = Driver(pipeline_of(task("a"), task("b"), task("c")))
    run.core.start()
    run.take()
    run.fail("a")
    assert not run.core.stopped
    assert run.take_all() == ["b", "c"]


def test_stop_cancels_pending_ready_and_parked_tasks_with_the_reason() -> None:
    policy = RetryPolicy(max_attempts=3, jitter=0.0)
    run = Driver(
        pipeline_of(
            task("parked", retry_policy=policy, criticality="high"),
            task("ready"),
            task("later", "ready"),
        )
    )
    run.core.start()
    assert run.take() == "parked"
    run.fail("parked")
    reason = KeyboardInterrupt("stop")
    cancelled = run.core.stop(reason)
    assert sorted(run.core.outcomes[i].name for i in cancelled) == ["later", "parked", "ready"]
    for name in ("parked", "ready", "later"):
        assert run.state(name) is TaskState.CANCELLED
    assert run.core.outcomes[run.i("ready")].error is reason
    assert run.core.done
    assert run.core.next_due() is None
    run.clock.now = 100.0
    assert run.take() is None


def test_a_success_after_stop_wakes_nothing() -> None:
    run = Driver(pipeline_of(task("a"), task("b", "a")))
    run.core.start()
    run.take()
    run.core.stop()
    assert run.succeed("a") == 0
    assert run.state("b") is TaskState.CANCELLED


def test_unclaim_puts_a_task_back_as_if_never_taken() -> None:
    run = Driver(pipeline_of(task("a", criticality="high"), task("b")))
    run.core.start()
    assert run.take() == "a"
    run.core.unclaim(run.i("a"))
    outcome = run.core.outcomes[run.i("a")]
    assert outcome.state is TaskState.READY
    assert outcome.attempts == 0
    assert run.core.active == 0
    assert run.take() == "a"


def test_abandon_running_cancels_a_running_task_once() -> None:
    run = Driver(pipeline_of(task("a"), task("b")))
    run.core.start()
    run.take_all()
    reason = KeyboardInterrupt()
    run.core.stop(reason)
    run.core.abandon_running(run.i("a"), reason)
    run.core.abandon_running(run.i("a"), reason)
    assert run.state("a") is TaskState.CANCELLED
    assert run.core.finished == 1
    assert run.core.active == 1


# -- preloaded results (resume) ----------------------------------------------


def test_preloaded_results_count_as_succeeded_without_running() -> None:
    run = Driver(pipeline_of(task("a"), task("b"), task("c", "a", "b"), task("d", "c")))
    run.core.start({"a": 1, "unknown": 0})
    a = run.core.outcomes[run.i("a")]
    assert a.state is TaskState.SUCCEEDED
    assert a.attempts == 0
    assert run.core.results == {"a": 1}
    assert run.core.finished == 1
    assert run.take_all() == ["b"]
    run.succeed("b", 2)
    assert run.take_all() == ["c"]


def test_a_fully_preloaded_run_is_done_at_start() -> None:
    run = Driver(pipeline_of(task("a"), task("b", "a")))
    run.core.start({"a": 1, "b": 2})
    assert run.core.done
    assert run.take() is None
    assert run.core.results == {"a": 1, "b": 2}


def test_cached_results_finish_a_task_with_no_attempt() -> None:
    run = Driver(pipeline_of(task("a"), task("b", "a")))
    run.core.start()
    run.take()
    assert run.core.cached(run.i("a"), 5) == 1
    a = run.core.outcomes[run.i("a")]
    assert a.state is TaskState.CACHED
    assert a.attempts == 0
    assert run.take() == "b"


# -- invariants under any completion order -----------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=30).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(
                st.lists(st.integers(min_value=0, max_value=n), max_size=3), min_size=n, max_size=n
            ),
            st.randoms(use_true_random=False),
        )
    )
)
def test_every_task_runs_once_after_its_dependencies(
    case: tuple[int, list[list[int]], random.Random],
) -> None:
    n, raw, rng = case
    tasks = [
        task(f"t{i}", *sorted({f"t{d % i}" for d in deps}) if i else ())
        for i, deps in enumerate(raw)
    ]
    run = Driver(pipeline_of(*tasks))
    run.core.start()
    running: list[str] = []
    finished: set[str] = set()
    dispatched: list[str] = []
    while not run.core.done:
        running += run.take_all()
        assert running, "the run stalled with work left"
        name = running.pop(rng.randrange(len(running)))
        deps = run.core.compiled.tasks[run.i(name)].dependency_names
        assert set(deps) <= finished
        dispatched.append(name)
        run.succeed(name)
        finished.add(name)
    assert sorted(dispatched) == sorted(t.name for t in tasks)
    assert len(dispatched) == n


@pytest.mark.parametrize("aging", [None, 0.5])
def test_ready_count_and_backlog_track_the_queue(aging: float | None) -> None:
    run = Driver(
        pipeline_of(task("a", criticality="blocker"), task("b"), task("c", criticality="low")),
        aging_interval=aging,
    )
    run.core.start()
    assert (run.core.ready_count, run.core.critical_backlog) == (3, 1)
    run.take()
    assert (run.core.ready_count, run.core.critical_backlog) == (2, 0)
