"""Learned task durations: kept in a real SQLite run store, used to rank the next run."""

from __future__ import annotations

import functools
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask, RunResult
from pipeopt.cli import main
from pipeopt.retry import RetryPolicy
from pipeopt.store import DB_NAME, SCHEMA_VERSION, RunStore

# Sleeps an order of magnitude apart, so that their order survives a loaded machine.
SECONDS = {"quick": 0.001, "medium": 0.01, "slow": 0.04}


def _sleep(seconds: float, **_: Any) -> float:
    time.sleep(seconds)
    return seconds


def _items() -> list[int]:
    return [1, 2, 3]


def _item(numbers: int) -> int:
    time.sleep(0.002 * numbers)
    return numbers


def independent(hints: dict[str, float] | None = None) -> Pipeline:
    """Three independent tasks added quickest first: hop counts keep that order."""
    pipeline = Pipeline("learn")
    for name in ("quick", "medium", "slow"):
        hint = (hints or {}).get(name)
        pipeline.add(
            PipelineTask(name, functools.partial(_sleep, SECONDS[name]), expected_duration=hint)
        )
    return pipeline


def started_order(result: RunResult) -> list[str]:
    """Return the task names in the order they started (one worker: the ranking order)."""
    timed = [o for o in result.tasks.values() if o.started_at is not None]
    return [o.name for o in sorted(timed, key=lambda o: o.started_at or 0.0)]


def run(state: Path | None, pipeline: Pipeline, **options: Any) -> RunResult:
    with PipelineOptimizer(max_workers=1, state_dir=state, **options) as optimizer:
        result = optimizer.run(pipeline)
    result.raise_for_status()
    return result


def test_the_second_run_ranks_by_learned_durations(tmp_path: Path) -> None:
    first = run(tmp_path, independent())
    assert started_order(first) == ["quick", "medium", "slow"]  # hop counts: FIFO
    second = run(tmp_path, independent())
    assert started_order(second) == ["slow", "medium", "quick"]
    with RunStore(tmp_path, read_only=True) as store:
        learned = store.learned_durations("learn").lookup()
        shown = {t.name: t for t in store.show_run(first.run_id).tasks}
        assert {t.estimate_source for t in shown.values()} == {"none"}
        shown = {t.name: t for t in store.show_run(second.run_id).tasks}
    assert set(learned) == {"quick", "medium", "slow"}
    for name, (seconds, samples) in learned.items():
        assert samples == 2
        assert SECONDS[name] <= seconds < SECONDS[name] + 0.5
    assert shown["slow"].estimate_source == "learned (1 sample)"
    assert shown["slow"].estimate is not None
    assert shown["slow"].estimate >= SECONDS["slow"]


def test_a_chain_outranks_a_single_task_without_history(tmp_path: Path) -> None:
    pipeline = Pipeline("hops")
    pipeline.add(PipelineTask("single", functools.partial(_sleep, 0.0)))
    pipeline.add(PipelineTask("head", functools.partial(_sleep, 0.0)))
    pipeline.add(PipelineTask("tail", functools.partial(_sleep, 0.0), dependencies=["head"]))
    result = run(tmp_path, pipeline)
    assert started_order(result) == ["head", "single", "tail"]
    with RunStore(tmp_path, read_only=True) as store:
        assert all(t.estimate is None for t in store.show_run(result.run_id).tasks)


def test_a_hint_wins_over_history(tmp_path: Path) -> None:
    run(tmp_path, independent())
    # The hint says "quick" is the longest: it is believed over what was learned.
    result = run(tmp_path, independent({"quick": 1.0}))
    assert started_order(result) == ["quick", "slow", "medium"]
    with RunStore(tmp_path, read_only=True) as store:
        shown = {t.name: t for t in store.show_run(result.run_id).tasks}
    assert (shown["quick"].estimate, shown["quick"].estimate_source) == (1.0, "hint")
    assert shown["slow"].estimate_source == "learned (1 sample)"


def test_learn_durations_false_neither_uses_nor_updates_them(tmp_path: Path) -> None:
    run(tmp_path, independent())
    result = run(tmp_path, independent(), learn_durations=False)
    assert started_order(result) == ["quick", "medium", "slow"]
    with RunStore(tmp_path, read_only=True) as store:
        assert store.learned_durations("learn").lookup()["slow"][1] == 1
        assert all(t.estimate is None for t in store.show_run(result.run_id).tasks)
        assert store.summary(result.run_id).succeeded == 3  # recorded all the same


def test_learn_durations_needs_a_store() -> None:
    assert PipelineOptimizer().learn_durations is False
    with pytest.raises(
        ValueError, match=r"learn_durations=True \(--learn-durations yes\) needs a run store"
    ):
        PipelineOptimizer(learn_durations=True)
    result = run(None, independent())  # no store: hop counts, nothing to record
    assert started_order(result) == ["quick", "medium", "slow"]


def mapped() -> Pipeline:
    pipeline = Pipeline("mapped")
    pipeline.add(PipelineTask("numbers", _items))
    pipeline.add(PipelineTask("each", _item, map_over="numbers"))
    pipeline.add(PipelineTask("other", functools.partial(_sleep, 0.0)))
    return pipeline


def test_mapped_items_learn_as_their_task(tmp_path: Path) -> None:
    run(tmp_path, mapped())
    second = run(tmp_path, mapped())
    with RunStore(tmp_path, read_only=True) as store:
        learned = store.learned_durations("mapped").lookup()
        shown = {t.name: t for t in store.show_run(second.run_id).tasks}
    assert set(learned) == {"numbers", "each", "other"}
    seconds, samples = learned["each"]
    assert samples == 6  # three items in each of two runs
    assert 0.004 <= seconds < 0.5  # the median item (2 x 2 ms), not their sum
    assert shown["each[2]"].estimate == shown["each"].estimate
    assert shown["each[2]"].estimate_source == "learned (3 samples)"


def test_resume_ranks_by_learned_durations_and_learns_only_what_ran(tmp_path: Path) -> None:
    run(tmp_path, independent())
    broken = Pipeline("learn")
    for name in ("quick", "medium"):
        broken.add(PipelineTask(name, functools.partial(_sleep, SECONDS[name])))
    broken.add(PipelineTask("slow", functools.partial(_sleep, "not a number")))
    with PipelineOptimizer(max_workers=1, state_dir=tmp_path) as optimizer:
        failed = optimizer.run(broken)
        assert started_order(failed) == ["slow", "medium", "quick"]
        resumed = optimizer.resume(independent(), failed.run_id)
    resumed.raise_for_status()
    assert started_order(resumed) == ["slow"]  # the others' results were reused
    with RunStore(tmp_path, read_only=True) as store:
        learned = store.learned_durations("learn").lookup()
    # quick and medium: first run and the failed run; resumed tasks ran nothing.
    assert {name: samples for name, (_, samples) in learned.items()} == {
        "quick": 2,
        "medium": 2,
        "slow": 2,
    }


def test_a_schema_3_store_is_upgraded_in_place_and_learns(tmp_path: Path) -> None:
    first = run(tmp_path, independent())
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("DROP TABLE task_estimates")
        conn.execute("DROP TABLE run_estimates")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
    conn.close()
    with RunStore(tmp_path, read_only=True) as store:  # read as it is
        assert store.learned_durations("learn").lookup() == {}
        assert {t.estimate_source for t in store.show_run(first.run_id).tasks} == {"none"}
    run(tmp_path, independent())  # upgrades, then learns from this run
    third = run(tmp_path, independent())
    assert started_order(third) == ["slow", "medium", "quick"]
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        runs = conn.execute("SELECT COUNT(*) FROM runs").fetchone()
    conn.close()
    assert version == (str(SCHEMA_VERSION),)
    assert runs == (3,)


def test_a_damaged_estimates_row_is_ignored_and_learned_anew(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(tmp_path, independent())
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("UPDATE task_estimates SET names = x'00ff', windows = x'00ff'")
    conn.close()
    second = run(tmp_path, independent())  # ranks by hops, then learns from this run
    assert started_order(second) == ["quick", "medium", "slow"]
    assert "learned durations unreadable" in caplog.text
    assert "learning them anew" in caplog.text
    assert started_order(run(tmp_path, independent())) == ["slow", "medium", "quick"]


def test_a_retried_task_learns_its_successful_attempt(tmp_path: Path) -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.05)
            raise RuntimeError("first attempt fails slowly")
        time.sleep(0.001)

    pipeline = Pipeline("retried")
    pipeline.add(
        PipelineTask("flaky", flaky, retry_policy=RetryPolicy(max_attempts=2, base_delay=0.0))
    )
    run(tmp_path, pipeline)
    with RunStore(tmp_path, read_only=True) as store:
        seconds, samples = store.learned_durations("retried").lookup()["flaky"]
    assert (samples, len(calls)) == (1, 2)
    assert seconds < 0.05


PIPELINE_FILE = """
import functools, time
from pipeopt import Pipeline, PipelineTask

def nap(seconds):
    time.sleep(seconds)

pipeline = Pipeline("naps")
pipeline.add(PipelineTask("hinted", functools.partial(nap, 0.001), expected_duration=0.5))
pipeline.add(PipelineTask("learned", functools.partial(nap, 0.02)))
"""


def test_cli_show_and_graph_tell_each_estimate_and_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    source = tmp_path / "naps.py"
    source.write_text(textwrap.dedent(PIPELINE_FILE))
    state = str(tmp_path / "state")
    for _ in range(2):
        assert main(["run", str(source), "--state-dir", state]) == 0
    capsys.readouterr()
    assert main(["show", "last", "--state-dir", state]) == 0
    shown = capsys.readouterr().out
    assert "estimate" in shown
    assert "source" in shown
    assert "0.500s" in shown
    assert "hint" in shown
    assert "learned (1 sample)" in shown
    assert main(["show", "last", "--state-dir", state, "--json"]) == 0
    tasks = {t["name"]: t for t in __import__("json").loads(capsys.readouterr().out)["tasks"]}
    assert tasks["learned"]["estimate_source"] == "learned (1 sample)"
    assert tasks["learned"]["estimate"] >= 0.02

    assert main(["graph", str(source), "--format", "dot"]) == 0
    plain = capsys.readouterr().out
    assert "0.5s, hint" in plain
    assert "learned (" not in plain
    assert main(["graph", str(source), "--format", "dot", "--state-dir", state]) == 0
    assert "s, learned (2 samples)" in capsys.readouterr().out
    assert main(["graph", str(source), "--state-dir", state]) == 0
    assert "s, learned #40;2 samples#41;" in capsys.readouterr().out


def test_cli_learn_durations_no_keeps_hop_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    source = tmp_path / "naps.py"
    source.write_text(textwrap.dedent(PIPELINE_FILE.replace(", expected_duration=0.5", "")))
    state = str(tmp_path / "state")
    for _ in range(2):
        assert main(["run", str(source), "--state-dir", state, "--learn-durations", "no"]) == 0
    capsys.readouterr()
    assert main(["show", "last", "--state-dir", state]) == 0
    assert "estimate" not in capsys.readouterr().out
    assert main(["run", str(source), "--no-state", "--learn-durations", "yes"]) == 2
    assert "needs a run store" in capsys.readouterr().err
