"""The run page's data, purely: timeline rows, critical path, loads, details, the clock."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from pipeopt.batching import AdaptiveBatcher
from pipeopt.dashboard.model import (
    MAX_LOG_LINES,
    attempt_rows,
    build_metrics_json,
    critical_path,
    load_rows,
    log_lines,
    task_detail,
)
from pipeopt.result import (
    AttemptRecord,
    RunGraph,
    RunSnapshot,
    RunStatus,
    TaskOutcome,
    TaskState,
)

T0 = 1_800_000_000.0


def outcome(name: str, state: TaskState, *records: AttemptRecord, **fields: Any) -> TaskOutcome:
    task = TaskOutcome(name=name, criticality="medium", state=state, **fields)
    task.attempt_history.extend(records)
    task.attempts = max(task.attempts, len(records))
    if records:
        task.started_at = records[0].started_at
        if state.is_final:
            task.finished_at = records[-1].started_at + records[-1].duration
    return task


def snap(tasks: list[TaskOutcome], **fields: Any) -> RunSnapshot:
    values: dict[str, Any] = {
        "run_id": "r1",
        "pipeline": "etl",
        "status": RunStatus.RUNNING,
        "started_at": T0,
        "taken_at": T0 + 10,
        "tasks_total": len(tasks),
        "tasks_active": 0,
        "critical_backlog": 0,
        "tasks_finished": 0,
        "failures_total": 0,
        "retries_total": 0,
        "tasks": {t.name: t for t in tasks},
        "batch_sizes": {},
        "breakers": {},
    }
    values.update(fields)
    return RunSnapshot(**values)


def test_elapsed_runs_with_the_clock_then_freezes_at_the_end() -> None:
    running = build_metrics_json(snap([]), [], T0 + 5)
    assert running["elapsed_s"] == 5.0
    assert running["ended_at"] is None
    done = snap([], status=RunStatus.SUCCEEDED, ended_at=T0 + 3)
    for later in (T0 + 5, T0 + 9.8, T0 + 3600):
        document = build_metrics_json(done, [], later)
        assert document["elapsed_s"] == 3.0
        assert document["ended_at"] is not None


def test_attempt_rows_mark_retried_failed_and_running_attempts() -> None:
    flaky = outcome(
        "flaky",
        TaskState.SUCCEEDED,
        AttemptRecord(1, T0 + 1, 0.5, ValueError("x"), "tb"),
        AttemptRecord(2, T0 + 2, 0.25),
    )
    broken = outcome("broken", TaskState.FAILED, AttemptRecord(1, T0, 1.0, ValueError("y")))
    waiting = outcome("waiting", TaskState.RETRYING, AttemptRecord(1, T0, 0.1, OSError("z")))
    busy = outcome("busy", TaskState.RUNNING, attempts=1)
    rows = attempt_rows([flaky, broken, waiting, busy], {"busy": T0 + 4}, T0)
    assert rows == [
        [0, 1, 1000.0, 500.0, "retried"],
        [0, 2, 2000.0, 250.0, "succeeded"],
        [1, 1, 0.0, 1000.0, "failed"],
        [2, 1, 0.0, 100.0, "retried"],
        [3, 1, 4000.0, None, "running"],
    ]
    assert attempt_rows([flaky], {}, None) == []


def test_critical_path_follows_the_dependency_that_ended_last() -> None:
    #  a(0..1) -> c(3..4) -> d(4..9)
    #  b(0..3) -^
    #  e(0..2) independent
    deps = [(), (), (0, 1), (2,), ()]
    ends: list[float | None] = [1.0, 3.0, 4.0, 9.0, 2.0]
    assert critical_path(deps, ends) == [1, 2, 3]
    assert critical_path(deps, [None] * 5) == []
    assert critical_path(None, ends) == []
    # A task that never ran is not on the path.
    assert critical_path(deps, [1.0, None, None, None, 2.0]) == [4]


def test_loads_show_rows_dead_letters_rate_and_the_batcher_model() -> None:
    batcher = AdaptiveBatcher(0.1, initial_size=100, clock=lambda: 0.0)
    for size in (100, 200, 400, 800, 1600, 100, 300):
        batcher.record(size, 0.001 + size * 1e-5)
    load = outcome("load", TaskState.SUCCEEDED, AttemptRecord(1, T0, 2.0))
    load.custom_metrics.update(rows_written=3000.0, rows_dead_lettered=5.0)
    plain = outcome("plain", TaskState.SUCCEEDED, AttemptRecord(1, T0, 1.0))
    rows = load_rows([load, plain], {"load": batcher.statistics()}, {"load": 1600}, T0 + 10)
    assert len(rows) == 1
    row = rows[0]
    assert row["task"] == "load"
    assert row["rows_written"] == 3000.0
    assert row["rows_dead_lettered"] == 5.0
    assert row["rows_per_s"] == 1500.0
    assert row["batch_size"] == batcher.statistics().current_size
    assert row["per_row_us"] is not None
    assert row["fixed_cost_ms"] is not None
    assert row["target_latency_ms"] == 100.0


def test_task_detail_has_attempts_traceback_logs_metrics_and_graph() -> None:
    records = [
        logging.LogRecord("t", logging.INFO, __file__, 1, "read %d rows", (7,), None),
        logging.LogRecord("t", logging.WARNING, __file__, 2, "slow sink", None, None),
    ]
    failed = outcome(
        "b",
        TaskState.FAILED,
        AttemptRecord(1, T0, 0.5, ValueError("bad row"), "Traceback...\nValueError: bad row"),
        traceback="Traceback...\nValueError: bad row",
        error=ValueError("bad row"),
    )
    failed.custom_metrics["rows"] = 3.0
    first = outcome("a", TaskState.SUCCEEDED, AttemptRecord(1, T0, 0.1))
    graph = RunGraph(
        names=("a", "b"),
        dependencies=((), (0,)),
        declared=("low", "critical"),
        groups=("low", "loads"),
        descriptions=("", "load the rows"),
    )
    snapshot = snap([first, failed], graph=graph)

    class WithLogs:
        def __init__(self, inner: TaskOutcome) -> None:
            self.inner = inner
            self.logs = records

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    snapshot_logs = snap([first, WithLogs(failed)], graph=graph)  # type: ignore[list-item]
    detail = task_detail(snapshot_logs, "b", T0 + 10)
    assert detail is not None
    assert detail["declared_criticality"] == "critical"
    assert detail["group"] == "loads"
    assert detail["dependencies"] == ["a"]
    assert detail["description"] == "load the rows"
    assert detail["traceback"].endswith("ValueError: bad row")
    assert detail["attempts_detail"][0]["outcome"] == "failed"
    assert detail["attempts_detail"][0]["error"] == "ValueError: bad row"
    assert detail["custom_metrics"] == {"rows": 3.0}
    assert [line["message"] for line in detail["logs"]] == ["read 7 rows", "slow sink"]
    assert [line["level"] for line in detail["logs"]] == ["INFO", "WARNING"]
    plain = task_detail(snapshot, "a", T0 + 10)
    assert plain is not None
    assert plain["dependents"] == ["b"]
    assert plain["logs"] == []
    assert task_detail(snapshot, "nope", T0) is None


def test_log_lines_keep_the_last_ones_and_take_plain_strings() -> None:
    lines = log_lines([f"line {i}" for i in range(MAX_LOG_LINES + 50)])
    assert len(lines) == MAX_LOG_LINES
    assert lines[-1]["message"] == f"line {MAX_LOG_LINES + 49}"
    assert log_lines(None) == []


def test_mapped_items_added_while_running_are_on_the_page() -> None:
    pytest.importorskip("aiohttp", reason="the dashboard needs aiohttp: pipeopt[dashboard]")
    from pipeopt import Pipeline, PipelineOptimizer
    from pipeopt.dashboard import PipelineDashboard

    p = Pipeline("mapped")

    @p.task
    def files() -> list[int]:
        return [1, 2, 3]

    @p.task(map_over=files)
    def parse(files: int) -> int:
        return files * 2

    optimizer = PipelineOptimizer(max_workers=2)
    dashboard = PipelineDashboard(optimizer)
    optimizer.snapshot()  # before the run: nothing to copy yet
    assert optimizer.run(p).ok
    for _ in range(2):  # the second render reuses the final tasks' parts
        document = json.loads(dashboard.render_metrics())
        names = [t["name"] for t in document["tasks"]]
        assert {"parse[0]", "parse[1]", "parse[2]"} <= set(names)
        assert len(document["attempts"]) == 4  # files and each item; parse itself only fans out
        assert document["critical_path"]
    detail = dashboard.render_task("parse[1]")
    assert detail is not None
    assert json.loads(detail)["state"] == "succeeded"


def test_a_real_load_reaches_the_loads_panel(tmp_path: Any) -> None:
    pytest.importorskip("aiohttp", reason="the dashboard needs aiohttp: pipeopt[dashboard]")
    from pipeopt import Pipeline, PipelineOptimizer
    from pipeopt.dashboard import PipelineDashboard
    from pipeopt.sinks import SQLiteSink

    p = Pipeline("loads")

    @p.task
    def load(context: Any) -> int:
        rows = [(i, i * 2) for i in range(5000)]
        with SQLiteSink(str(tmp_path / "shop.db"), "orders", columns=["id", "qty"]) as sink:
            return int(context.write_batches(rows, sink).rows_written)

    optimizer = PipelineOptimizer(max_workers=1)
    dashboard = PipelineDashboard(optimizer)
    assert optimizer.run(p).results["load"] == 5000
    loads = json.loads(dashboard.render_metrics())["loads"]
    assert [row["task"] for row in loads] == ["load"]
    row = loads[0]
    assert row["rows_written"] == 5000
    assert row["rows_dead_lettered"] == 0
    assert row["rows_per_s"] > 0
    assert row["batches"] >= 1
    assert row["batch_size"] >= 1
    assert row["target_latency_ms"] == 100.0
