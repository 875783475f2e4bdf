"""``RunStoreUI`` (``pipeopt ui``) over a real SQLite run store, with a finished and a crashed run.

The crashed run is a real process killed with SIGKILL once its first attempts
are recorded. The live dashboard's document and the store's document of the
same run are compared: one schema, one page.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the run store UI needs aiohttp: pipeopt[dashboard]")

from pipeopt import Pipeline, PipelineOptimizer, RetryPolicy
from pipeopt.dashboard import CONTENT_SECURITY_POLICY, RunStoreUI
from pipeopt.dashboard.model import build_metrics_json
from pipeopt.dashboard.stored import build_stored_json
from pipeopt.store import RunStore

EVIL = "<img src=x onerror=alert(1)>"
WAIT = 30.0
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic"]

CRASHING = textwrap.dedent(
    """
    import sys, time
    from pipeopt import Pipeline, PipelineOptimizer

    p = Pipeline("crashing")

    @p.task(criticality="critical")
    def extract():
        return 1

    @p.task
    def broken():
        raise ValueError("bad input row 7")

    @p.task(dependencies=["extract"])
    def stuck(extract):
        time.sleep(600)

    PipelineOptimizer(max_workers=3, state_dir=sys.argv[1]).run(p)
    """
)


def build_finished() -> Pipeline:
    p = Pipeline("nightly " + EVIL)
    calls = {"flaky": 0}

    @p.task(criticality="critical")
    def extract() -> int:
        return 1

    @p.task(dependencies=["extract"], retry_policy=RetryPolicy(max_attempts=2, base_delay=0.01))
    def flaky(extract: int) -> int:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("first try fails")
        return extract

    def explode() -> None:
        raise ValueError(EVIL)

    p.task(name=EVIL, criticality="low")(explode)
    p.task(name="report", dependencies=["flaky"])(lambda: None)
    return p


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A state folder with one finished (failed) run and one crashed run."""
    root = tmp_path_factory.mktemp("ui")
    state = root / "state"
    optimizer = PipelineOptimizer(max_workers=2, state_dir=state)
    finished = optimizer.run(build_finished())
    live = build_metrics_json(optimizer.snapshot(), [], time.time())
    optimizer.close()

    script = root / "crashing.py"
    script.write_text(CRASHING)
    proc = subprocess.Popen([sys.executable, str(script), str(state)])
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert proc.poll() is None, "the crashing run ended by itself"
            with RunStore(state) as store:
                runs = [r for r in store.list_runs(10) if r.pipeline == "crashing"]
                if runs and runs[0].succeeded >= 1 and runs[0].failed >= 1:
                    crashed_id = runs[0].run_id
                    break
            assert time.monotonic() < deadline, "the crashing run never recorded its attempts"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    return {"state": state, "finished": finished, "live": live, "crashed": crashed_id}


@pytest.fixture
def ui(store_runs: dict[str, Any]) -> Iterator[RunStoreUI]:
    store = RunStore(store_runs["state"])
    server = RunStoreUI(store, refresh_interval=0.2)
    server.start_in_thread()
    try:
        yield server
    finally:
        server.stop_in_thread()
        store.close()


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), exc.read()


def test_the_store_document_has_the_live_schema(store_runs: dict[str, Any]) -> None:
    with RunStore(store_runs["state"]) as store:
        stored = build_stored_json(store.show_run(store_runs["finished"].run_id), time.time())
    live = store_runs["live"]
    assert set(stored) >= set(live) - {"refresh_interval"}
    assert stored["schema"] == live["schema"]
    assert stored["source"] == "store"
    assert live["source"] == "live"
    for key in ("run_id", "pipeline", "status", "tasks_total", "failures_total", "counts"):
        assert stored[key] == live[key], key
    assert stored["retries_total"] == live["retries_total"] == 1
    assert [(t["name"], t["state"], t["attempts"]) for t in stored["tasks"]] == [
        (t["name"], t["state"], t["attempts"]) for t in live["tasks"]
    ]
    assert sorted((r[0], r[1], r[4]) for r in stored["attempts"]) == sorted(
        (r[0], r[1], r[4]) for r in live["attempts"]
    )
    assert stored["elapsed_s"] == pytest.approx(live["elapsed_s"], abs=0.05)
    for document in (live, stored):
        path = document["critical_path"]
        names = [document["tasks"][i]["name"] for i in path]
        assert names[-2:] == ["flaky", "report"] or names[-1] == EVIL, names
    stored_names = [stored["tasks"][i]["name"] for i in stored["critical_path"]]
    if stored_names[-1] == "report":
        assert stored_names == ["extract", "flaky", "report"]
    # The store clocks the run from its own record of the start, a moment earlier:
    # attempts keep their spacing.
    live_rows, stored_rows = sorted(live["attempts"]), sorted(stored["attempts"])
    shift = stored_rows[0][2] - live_rows[0][2]
    assert 0 <= shift < 1000
    for live_row, stored_row in zip(live_rows, stored_rows, strict=True):
        assert stored_row[2] - shift == pytest.approx(live_row[2], abs=1.0)
        assert stored_row[3] == pytest.approx(live_row[3], abs=0.2)


def test_runs_list_and_a_crashed_run_over_http(ui: RunStoreUI, store_runs: dict[str, Any]) -> None:
    status, headers, body = get(ui.url + "api/runs")
    assert status == 200
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    runs = {run["run_id"]: run for run in json.loads(body)["runs"]}
    crashed = runs[store_runs["crashed"]]
    assert crashed["status"] == "crashed"
    assert crashed["pipeline"] == "crashing"
    finished = runs[store_runs["finished"].run_id]
    assert finished["status"] == "failed"
    assert finished["pipeline"] == "nightly " + EVIL
    assert finished["counts"]["failed"] == 1
    assert finished["duration_s"] > 0

    status, _, body = get(ui.url + "api/runs/" + store_runs["crashed"])
    assert status == 200
    document = json.loads(body)
    assert document["status"] == "crashed"
    assert document["ended_at"] is not None  # the clock stops at the last record
    states = {t["name"]: t["state"] for t in document["tasks"]}
    assert states["extract"] == "succeeded"
    assert states["broken"] == "failed"
    assert states["stuck"] == "pending"  # its attempt never ended, so it was never recorded
    assert len(document["attempts"]) == 2

    status, _, body = get(ui.url + "api/runs/" + store_runs["crashed"] + "/task?name=broken")
    assert status == 200
    detail = json.loads(body)
    assert detail["error"] == "ValueError: bad input row 7"
    assert detail["dependencies"] == []
    assert detail["declared_criticality"] == "medium"
    assert "Traceback (most recent call last)" in detail["traceback"]

    status, _, body = get(ui.url + "runs/" + store_runs["crashed"])
    assert status == 200
    assert b'data-api="/api/runs/' + store_runs["crashed"].encode() + b'"' in body
    assert get(ui.url + "api/runs/nope")[0] == 404
    assert get(ui.url + "api/runs/" + store_runs["crashed"] + "/task?name=nope")[0] == 404


def test_ui_keeps_the_dashboards_safety_rules(store_runs: dict[str, Any]) -> None:
    with RunStore(store_runs["state"]) as store:
        with pytest.raises(ValueError, match="not a loopback address"):
            RunStoreUI(store, host="0.0.0.0")
        server = RunStoreUI(store, token="s3cret")
        server.start_in_thread()
        try:
            assert get(server.url + "api/runs")[0] == 401
            assert get(server.url + "api/runs", Authorization="Bearer s3cret")[0] == 200
            assert get(server.url + "healthz")[0] == 200
            host = f"evil.example:{server.port}"
            assert get(server.url + "api/runs", Host=host, Authorization="Bearer s3cret")[0] == 403
            request = urllib.request.Request(server.url + "api/runs", method="POST", data=b"")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 405
            refused.value.close()
        finally:
            server.stop_in_thread()


@pytest.mark.browser
def test_ui_in_chromium_lists_runs_and_opens_a_crashed_one(
    ui: RunStoreUI, store_runs: dict[str, Any], chromium_path: str, artifacts_dir: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("dialog", lambda dialog: (errors.append("dialog"), dialog.dismiss()))
            page.set_default_timeout(WAIT * 1000)
            expect.set_options(timeout=WAIT * 1000)

            page.goto(ui.page_url)
            rows = page.locator("#runs tbody tr")
            expect(rows).to_have_count(2)
            crashed_row = page.locator("#runs tbody tr.row-crashed")
            expect(crashed_row.locator(".badge")).to_have_text("crashed")
            finished_row = page.locator("#runs tbody tr.row-failed")
            expect(finished_row.locator("td.name").first).to_have_text("nightly " + EVIL)
            assert page.locator("main img").count() == 0
            page.screenshot(path=str(artifacts_dir / "ui-runs.png"), full_page=True)

            crashed_row.locator("a.run-link").click()
            page.wait_for_url("**/runs/" + store_runs["crashed"])
            expect(page.locator("#status")).to_have_text("crashed")
            expect(page.locator("#finished-banner")).to_contain_text("Run crashed")
            expect(page.locator("#conn")).to_have_text("stored")
            expect(page.locator("#timeline")).to_have_attribute("data-bars", "2")
            expect(page.locator("#tasks tbody tr").nth(0).locator(".badge")).to_have_text("failed")
            page.locator("#tasks tbody tr", has=page.locator("td.name", has_text="broken")).click()
            expect(page.locator("#d-traceback")).to_contain_text("ValueError: bad input row 7")
            page.screenshot(path=str(artifacts_dir / "ui-crashed-run.png"), full_page=True)

            page.locator("#runs-link").click()
            finished = page.locator("#runs tbody tr.row-failed a.run-link")
            finished.click()
            expect(page.locator("#pipeline")).to_have_text("nightly " + EVIL)
            expect(page.locator("#status")).to_have_text("failed")
            expect(page.locator("#timeline")).to_have_attribute("data-bars", "5")
            expect(page.locator("#timeline")).to_have_attribute("data-waits", "1")
            evil = page.locator("#tasks tbody tr", has=page.locator("td.name", has_text=EVIL))
            expect(evil.locator("td.error")).to_have_text(f"ValueError: {EVIL}")
            page.screenshot(path=str(artifacts_dir / "ui-finished-run.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
