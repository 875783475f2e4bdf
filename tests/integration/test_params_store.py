"""Run parameters and captured logs in the run store: recorded, shown, reused by resume."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pytest

from pipeopt import ParameterError, Pipeline, PipelineOptimizer, TaskState


def daily(calls: list[tuple[str, Any]], gate: Path) -> Pipeline:
    p = Pipeline("daily", params={"day": dt.date(2013, 1, 1), "limit": 100})

    @p.task
    def extract(context: Any, params: Any) -> int:
        calls.append(("extract", params["day"]))
        context.logger.info("extracting %s", params["day"])
        return int(params["limit"])

    @p.task(dependencies=[extract])
    def load(extract: int, params: Any) -> int:
        calls.append(("load", params["day"]))
        if params["limit"] == 5 and not gate.exists():
            logging.getLogger("tests.load").error("target not ready")
            raise RuntimeError("target not ready")
        return extract

    return p


def test_parameters_are_recorded_and_reused_by_resume(tmp_path: Path) -> None:
    calls: list[tuple[str, Any]] = []
    p = daily(calls, tmp_path / "gate")
    with PipelineOptimizer(max_workers=2, state_dir=tmp_path / "state") as optimizer:
        first = optimizer.run(p, params={"day": dt.date(2013, 2, 1), "limit": 5})
        assert first.tasks["load"].state is TaskState.FAILED
        store = optimizer.store
        assert store is not None
        summary = store.summary(first.run_id)
        assert summary.params == {"day": dt.date(2013, 2, 1), "limit": 5}
        detail = {t.name: t for t in store.show_run(first.run_id).tasks}
        assert detail["extract"].logs[0].endswith("[extract #1] extracting 2013-02-01")
        assert detail["load"].logs[0].endswith("ERROR tests.load: target not ready")
        assert "RuntimeError: target not ready" in (detail["load"].traceback or "")
        assert detail["load"].declared_criticality == "medium"

        with pytest.raises(ParameterError, match="'limit' was 5, now 6"):
            optimizer.resume(p, first.run_id, params={"limit": 6})

        (tmp_path / "gate").touch()
        calls.clear()
        resumed = optimizer.resume(p, first.run_id)
        assert resumed.ok
        assert resumed.params == {"day": dt.date(2013, 2, 1), "limit": 5}
        assert calls == [("load", dt.date(2013, 2, 1))]  # extract was not run again

        forced = optimizer.resume(p, first.run_id, params={"limit": 6}, force=True)
        assert forced.params["limit"] == 6
