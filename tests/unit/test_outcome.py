"""TaskOutcome: containers made on first use, yet equal, printed and pickled like the dataclass."""

from __future__ import annotations

import pickle

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask, RetryPolicy, TaskOutcome, TaskState
from pipeopt.result import AttemptRecord, copy_outcome, outcome_logs, outcome_metrics

BAD_ROW, MISSING_KEY = ValueError("bad row"), KeyError("k")


def full_outcome() -> TaskOutcome:
    return TaskOutcome(
        "load",
        "high",
        "medium",
        TaskState.FAILED,
        2,
        10.0,
        12.5,
        BAD_ROW,
        "Traceback ...",
        [AttemptRecord(1, 10.0, 1.0, MISSING_KEY), AttemptRecord(2, 11.5, 1.0)],
        {"rows": 3.0},
        ["line"],
    )


def test_fresh_outcome_has_empty_containers_of_the_public_types() -> None:
    outcome = TaskOutcome("a", "medium")
    assert outcome_metrics(outcome) == {}
    assert outcome_logs(outcome) == ()
    assert outcome.attempt_history == []
    assert outcome.custom_metrics == {}
    assert outcome.logs == []
    outcome.logs.append("kept")
    outcome.custom_metrics["rows"] = 1.0
    assert outcome.logs == ["kept"]
    assert outcome_metrics(outcome) == {"rows": 1.0}
    assert outcome.finished_at is None
    assert outcome.duration is None


def test_equality_repr_and_pickle_match_the_fields() -> None:
    outcome = full_outcome()
    assert outcome == full_outcome()
    assert outcome != TaskOutcome("load", "high")
    assert outcome != "load"
    assert TaskOutcome("a", "low") == TaskOutcome("a", "low", attempt_history=[], logs=[])
    assert repr(TaskOutcome("a", "low")) == (
        "TaskOutcome(name='a', criticality='low', declared_criticality=None, "
        "state=<TaskState.PENDING: 'pending'>, attempts=0, started_at=None, finished_at=None, "
        "error=None, traceback=None, attempt_history=[], custom_metrics={}, logs=[])"
    )
    back = pickle.loads(pickle.dumps(outcome))
    assert [r[:3] for r in back.attempt_history] == [(1, 10.0, 1.0), (2, 11.5, 1.0)]
    assert (back.name, back.state, back.finished_at) == ("load", "failed", 12.5)
    assert back.logs == ["line"]
    assert str(back.error) == "bad row"
    copied = copy_outcome(outcome)
    assert copied == outcome
    copied.logs.append("only in the copy")
    assert outcome.logs == ["line"]
    try:
        hash(outcome)
    except TypeError:
        pass
    else:
        raise AssertionError("a mutable outcome must not be hashable")


def test_first_attempt_success_builds_the_same_history_on_access() -> None:
    pipeline = Pipeline("p")
    pipeline.add(PipelineTask("a", lambda: 1))
    result = PipelineOptimizer(max_workers=1).run(pipeline)
    outcome = result.tasks["a"]
    kept = outcome._history
    assert isinstance(kept, float)  # only the attempt's duration is kept
    started, finished = outcome.started_at, outcome.finished_at
    assert started is not None
    assert finished == started + kept
    snapshot = copy_outcome(outcome)
    assert snapshot == outcome
    state = pickle.loads(pickle.dumps(outcome))
    (record,) = outcome.attempt_history
    assert record == AttemptRecord(1, started, kept)
    assert record.duration is kept
    assert outcome.finished_at == finished  # unchanged once the history is a list
    assert state == outcome
    assert snapshot == outcome


def test_retried_task_keeps_every_attempt() -> None:
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("once")
        return 2

    pipeline = Pipeline("p")
    pipeline.add(PipelineTask("a", flaky, retry_policy=RetryPolicy(max_attempts=2, base_delay=0)))
    outcome = PipelineOptimizer(max_workers=1).run(pipeline).tasks["a"]
    first, second = outcome.attempt_history
    assert (first.number, type(first.error), second.number, second.error) == (1, OSError, 2, None)
    assert outcome.finished_at == second.started_at + second.duration


def test_threads_of_one_body_lose_nothing_on_first_use() -> None:
    import contextvars
    import threading

    from pipeopt import TaskContext

    def fan(context: TaskContext) -> None:
        start = threading.Barrier(8)

        def work(k: int) -> None:
            start.wait()  # all eight make their first write together
            context.record_custom_metric(f"m{k}", k)
            context.logger.warning("from thread %d", k)

        # A thread a body starts logs under the task when it runs in a copy of the body's context.
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(work, k))
            for k in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    p = Pipeline("threads")
    p.add(PipelineTask("fan", fan))
    for _ in range(20):
        outcome = PipelineOptimizer(max_workers=1).run(p).tasks["fan"]
        assert outcome.custom_metrics == {f"m{k}": float(k) for k in range(8)}
        assert len([line for line in outcome.logs if "from thread" in line]) == 8
