"""The dashboard page in Debian's chromium, driven by Playwright, during a real run.

Never downloads a browser: it launches /usr/bin/chromium (the ``chromium_path``
fixture skips, or fails under ``PIPEOPT_REQUIRE_BROWSER=1``, when it or
Playwright is missing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("aiohttp", reason="the dashboard needs aiohttp: pipeopt[dashboard]")

from pipeopt import Pipeline, PipelineOptimizer, RunResult
from pipeopt.breaker import CircuitBreaker
from pipeopt.dashboard import PipelineDashboard, generate_token
from pipeopt.retry import RetryPolicy

pytestmark = pytest.mark.browser

EVIL = "<img src=x onerror=alert(1)>"
CONTROL = "ctl\x1b[31m\x07<b>bold</b>"
CONTROL_SHOWN = "ctl\u241b[31m\u2407<b>bold</b>"  # control characters as their pictures
WAIT = 20.0  # generous: CI machines are shared, and a cached body may be ~5 s old
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def build_pipeline(gates: dict[str, threading.Event]) -> Pipeline:
    """Return a small ETL whose gated tasks finish when the test opens their gate."""
    pipeline = Pipeline("browser-demo")

    def waiter(name: str) -> Callable[[], str]:
        def body() -> str:
            assert gates[name].wait(WAIT), f"gate {name} never opened"
            return name

        return body

    def explode(context: Any) -> None:
        context.logger.warning("about to fail on purpose")
        raise ValueError(EVIL)

    calls = {"flaky": 0}

    def flaky() -> int:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("first try fails")
        return 1

    def quick() -> int:
        return 1

    pipeline.task(name="extract_flights", criticality="critical")(quick)
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=60, name="weather-api")
    pipeline.task(name="extract_weather", criticality="high", circuit_breaker=breaker)(quick)
    pipeline.task(
        name="join", dependencies=["extract_flights", "extract_weather"], criticality="critical"
    )(waiter("join"))
    pipeline.task(name="load_warehouse", dependencies=["join"], criticality="high")(waiter("load"))
    pipeline.task(name="refresh_report", dependencies=["load_warehouse"], criticality="low")(quick)
    pipeline.task(name=EVIL, criticality="medium")(explode)
    pipeline.task(name="notify", dependencies=[EVIL], criticality="deferred")(quick)
    pipeline.task(name=CONTROL, criticality="low")(quick)
    retry = RetryPolicy(max_attempts=2, base_delay=0.05, jitter=0)
    pipeline.task(name="flaky_api", criticality="high", retry_policy=retry)(flaky)
    return pipeline


def wait_for(page: Any, expression: str) -> None:
    """Poll a JavaScript expression until it is true (evaluate is not subject to the CSP)."""
    deadline = time.monotonic() + WAIT
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        page.wait_for_timeout(100)


@pytest.fixture
def live_run() -> Iterator[tuple[PipelineOptimizer, dict[str, threading.Event]]]:
    gates = {"join": threading.Event(), "load": threading.Event()}
    optimizer = PipelineOptimizer(max_workers=4)
    outcome: list[RunResult] = []
    thread = threading.Thread(
        target=lambda: outcome.append(optimizer.run(build_pipeline(gates))), daemon=True
    )
    thread.start()
    try:
        yield optimizer, gates
    finally:
        for gate in gates.values():
            gate.set()
        thread.join(WAIT)
    assert not thread.is_alive(), "the run did not finish"
    assert outcome, "the run raised"


def test_page_updates_live_and_shows_names_as_text(
    live_run: tuple[PipelineOptimizer, dict[str, threading.Event]],
    chromium_path: str,
    artifacts_dir: Path,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    optimizer, gates = live_run
    token = generate_token()
    requests: list[str] = []
    navigations: list[str] = []
    errors: list[str] = []
    dialogs: list[str] = []

    def on_console(message: Any) -> None:
        if message.type == "error":
            errors.append(f"console {message.type}: {message.text}")

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    with (
        PipelineDashboard(optimizer, token=token, refresh_interval=0.2) as dash,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on(
                "framenavigated",
                lambda frame: navigations.append(frame.url) if frame == page.main_frame else None,
            )
            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on("dialog", on_dialog)
            page.set_default_timeout(WAIT * 1000)
            expect.set_options(timeout=WAIT * 1000)

            page.goto(dash.page_url)
            expect(page.locator("#pipeline")).to_have_text("browser-demo")
            expect(page.locator("#status")).to_have_text("running")
            expect(page.locator("#conn")).to_have_text("live")
            # extract_*, the control-character task and flaky_api (on its second try)
            # succeeded, the odd task failed and notify was skipped; join runs.
            expect(page.locator("#finished")).to_have_text("6")
            expect(page.locator("#total")).to_have_text("of 9")
            expect(page.locator("#active")).to_have_text("1")
            expect(page.locator("#failures")).to_have_text("1")
            expect(page.locator("#retries")).to_have_text("1")
            expect(page.locator("#breakers td.breaker-closed")).to_have_text("closed")
            expect(page.locator("#finished-banner")).to_be_hidden()

            # Failures sort first, then running tasks.
            rows = page.locator("#tasks tbody tr")
            expect(rows.nth(0).locator(".badge")).to_have_text("failed")
            expect(rows.nth(0).locator("td.name")).to_have_text(EVIL)
            expect(rows.nth(1).locator("td.name")).to_have_text("join")
            expect(rows.nth(1).locator(".badge")).to_have_text("running")

            # The odd names and the error are literal text, not markup.
            row = page.locator("#tasks tbody tr", has=page.locator("td.name", has_text=EVIL))
            expect(row.locator("td.error")).to_have_text(f"ValueError: {EVIL}")
            expect(page.locator("#tasks tbody td.name", has_text="bold</b>")).to_have_text(
                CONTROL_SHOWN
            )
            assert page.locator("main img, #tasks b").count() == 0

            # The timeline draws a bar per attempt: the retried one, and the running join.
            timeline = page.locator("#timeline")
            wait_for(page, "Number(document.getElementById('timeline').dataset.bars) >= 7")
            assert int(timeline.get_attribute("data-waits") or 0) == 1
            bars_running = int(timeline.get_attribute("data-bars") or 0)

            # Search narrows the table; a click opens a task's details.
            page.fill("#search", "extract")
            expect(rows).to_have_count(2)
            page.fill("#search", "")
            row.click()
            details = page.locator("#details")
            expect(details).to_be_visible()
            expect(page.locator("#d-name")).to_have_text(EVIL)
            expect(page.locator("#d-state")).to_have_text("failed")
            traceback = page.locator("#d-traceback")
            expect(traceback).to_contain_text("Traceback (most recent call last)")
            expect(page.locator("#d-traceback")).to_contain_text(f"ValueError: {EVIL}")
            expect(page.locator("#d-attempts tbody tr")).to_have_count(1)
            expect(page.locator("#d-logs")).to_contain_text("about to fail on purpose")
            page.screenshot(path=str(artifacts_dir / "dashboard-running.png"), full_page=True)

            # Let the chart gather a few samples, then the numbers move without a reload.
            wait_for(
                page,
                "document.querySelectorAll('#chart polyline.line-throughput').length === 1"
                " && document.querySelector('#chart polyline.line-throughput')"
                ".getAttribute('points').split(' ').length >= 4",
            )
            gates["join"].set()
            join = page.locator("#tasks tbody tr", has=page.locator("td.name", has_text="join"))
            expect(join.locator(".badge")).to_have_text("succeeded")
            expect(page.locator("#finished")).to_have_text("7")
            gates["load"].set()
            expect(page.locator("#status")).to_have_text("failed")
            expect(page.locator("#finished")).to_have_text("9")
            expect(page.locator("#active")).to_have_text("0")
            expect(page.locator("#counts .chip.state-succeeded .chip-count")).to_have_text("7")
            wait_for(
                page, f"Number(document.getElementById('timeline').dataset.bars) > {bars_running}"
            )
            assert int(timeline.get_attribute("data-critical") or 0) >= 3
            assert page.locator("#throughput").inner_text() not in ("", "–", "0")
            assert page.locator("#latency").inner_text() != "–"

            # The clock stops at the end, and the page says the run finished.
            banner = page.locator("#finished-banner")
            expect(banner).to_contain_text("Run finished: failed")
            frozen = page.locator("#elapsed").inner_text()
            polls = sum("/api/run" in url for url in requests)
            wait_for(
                page,
                f"performance.getEntriesByType('resource')"
                f".filter(e => e.name.includes('/api/run')).length >= {polls + 3}",
            )
            assert page.locator("#elapsed").inner_text() == frozen

            page.screenshot(path=str(artifacts_dir / "dashboard.png"), full_page=True)
            context.close()
        finally:
            browser.close()

    assert len(navigations) == 1, navigations
    assert errors == []
    assert dialogs == []
    assert requests, "the page made no requests"
    assert all(urlsplit(url).hostname == "127.0.0.1" for url in requests), requests
    # The polls carried the token in a header (the page URL has it only once).
    assert sum("/api/run" in url for url in requests) >= 3
    assert not any("/api/run?" in url for url in requests)
