"""The dashboard as a real server on a loopback port, watching a real run.

Tasks block on ``threading.Event`` gates, so each test decides when a task
finishes; the tests poll the server for the state they expect (with a
deadline) instead of sleeping for a guessed time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the dashboard needs aiohttp: pipeopt[dashboard]")

from prometheus_client.openmetrics import parser as om_parser  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pipeopt import Pipeline, PipelineOptimizer, RunResult  # noqa: E402
from pipeopt.breaker import CircuitBreaker  # noqa: E402
from pipeopt.dashboard import (  # noqa: E402
    CONTENT_SECURITY_POLICY,
    PipelineDashboard,
    generate_token,
)
from pipeopt.retry import RetryPolicy  # noqa: E402

EVIL = "<img src=x onerror=alert(1)>"
QUOTED = 'say "hi"\\there'  # a quote and a backslash, which label values must escape
WAIT = 10.0  # seconds before a polled condition is declared never met


@dataclass
class GatedRun:
    """A pipeline whose tasks each wait for their own gate, run on a thread."""

    optimizer: PipelineOptimizer
    pipeline: Pipeline
    gates: dict[str, threading.Event]
    thread: threading.Thread | None = None
    result: RunResult | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        def target() -> None:
            try:
                self.result = self.optimizer.run(self.pipeline)
            except BaseException as exc:  # reported by finish()
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=target, name="test-run", daemon=True)
        self.thread.start()

    def release(self, *names: str) -> None:
        for name in names:
            self.gates[name].set()

    def finish(self) -> RunResult:
        for gate in self.gates.values():
            gate.set()
        assert self.thread is not None
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the run did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def gated_pipeline() -> tuple[Pipeline, dict[str, threading.Event]]:
    """Return extract → transform, a slow task, a failing branch, a retry, a breaker, odd names."""
    gates = {name: threading.Event() for name in ("extract", "transform", "slow", "boom")}
    pipeline = Pipeline("gated")

    def waiter(name: str) -> Callable[[], str]:
        def body() -> str:
            assert gates[name].wait(WAIT), f"gate {name} never opened"
            return name

        return body

    def explode() -> None:
        assert gates["boom"].wait(WAIT)
        raise ValueError(f"kaput {EVIL}")

    def quick() -> int:
        return 1

    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("blip")
        return 1

    pipeline.task(name="extract", criticality="critical")(waiter("extract"))
    pipeline.task(name="transform", dependencies=["extract"], criticality="high")(
        waiter("transform")
    )
    pipeline.task(name="slow", criticality="low")(waiter("slow"))
    pipeline.task(name="boom", criticality="medium")(explode)
    pipeline.task(name="after_boom", dependencies=["boom"])(quick)
    pipeline.task(name=EVIL, criticality="low")(quick)
    pipeline.task(name=QUOTED, criticality="low")(quick)
    pipeline.task(name="flaky", retry_policy=RetryPolicy(max_attempts=2, base_delay=0, jitter=0))(
        flaky
    )
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=60, name="warehouse-db")
    pipeline.task(name="guarded", circuit_breaker=breaker)(quick)
    return pipeline, gates


@pytest.fixture
def run() -> Iterator[GatedRun]:
    pipeline, gates = gated_pipeline()
    gated = GatedRun(PipelineOptimizer(max_workers=4), pipeline, gates)
    yield gated
    if gated.thread is not None:
        gated.finish()


@pytest.fixture
def optimizer() -> PipelineOptimizer:
    return PipelineOptimizer(max_workers=2)


# -- helpers -------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("application/json")
        document: dict[str, Any] = json.loads(await response.read())
        return document


async def poll(
    session: aiohttp.ClientSession, url: str, condition: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Return the first /metrics document meeting ``condition``; fail after WAIT seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        document = await get_json(session, url)
        if condition(document):
            return document
        if loop.time() > deadline:
            pytest.fail(f"condition never met; last document: {json.dumps(document)[:2000]}")
        await asyncio.sleep(0.01)


def states(document: dict[str, Any]) -> dict[str, str]:
    return {task["name"]: task["state"] for task in document["tasks"]}


def stamp(document: dict[str, Any]) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(document["last_update"])
    assert parsed.utcoffset() == dt.timedelta(0)
    return parsed


# Each task's metrics group: the gated pipeline declares none, so it is the criticality.
GROUPS = {
    "extract": "critical",
    "transform": "high",
    "slow": "low",
    EVIL: "low",
    QUOTED: "low",
}


def series_key(name: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Return a sample's key; the gated pipeline's labels are filled in when left out."""
    full = {"pipeline": "gated", **labels}
    if "task" in full and "group" not in full:
        full["group"] = GROUPS.get(full["task"], "medium")
    return name, tuple(sorted(full.items()))


def check_families(families: list[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Check no duplicate family or series and consistent histograms; return every sample."""
    names = [family.name for family in families]
    assert len(names) == len(set(names)), f"duplicate families: {names}"
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in families:
        for s in family.samples:
            key = series_key(s.name, s.labels)
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
        if family.type != "histogram":
            continue
        buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        for s in family.samples:
            rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                buckets.setdefault(rest, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                counts[rest] = s.value
        assert buckets.keys() == counts.keys(), family.name
        for rest, series in buckets.items():
            bounds = [bound for bound, _ in series]
            values = [value for _, value in series]
            assert bounds == sorted(bounds), f"{family.name}{rest}: buckets out of order"
            assert bounds[-1] == float("inf"), f"{family.name}{rest}: no +Inf bucket"
            assert values == sorted(values), f"{family.name}{rest}: buckets not cumulative"
            assert values[-1] == counts[rest], f"{family.name}{rest}: +Inf != _count"
    return samples


# -- a live run ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_metrics_follow_a_live_run(run: GatedRun, promtool_path: str) -> None:
    async with (
        PipelineDashboard(run.optimizer, refresh_interval=0.05) as dash,
        aiohttp.ClientSession() as session,
    ):
        url = dash.url + "metrics"
        idle = await get_json(session, url)
        assert idle["run_id"] is None
        assert idle["tasks"] == []
        assert idle["status"] is None

        run.start()
        first = await poll(
            session,
            url,
            lambda d: (
                d["status"] == "running"
                and {"extract", "slow", "boom"}
                <= {n for n, s in states(d).items() if s == "running"}
            ),
        )
        assert first["pipeline"] == "gated"
        assert first["run_id"] == run.optimizer.snapshot().run_id
        assert first["tasks_total"] == 9
        assert first["tasks_active"] >= 3
        assert states(first)["transform"] == "pending"
        assert states(first)["after_boom"] == "pending"
        assert sum(first["counts"].values()) == 9
        assert first["failures_total"] == 0

        run.release("extract")
        second = await poll(
            session,
            url,
            lambda d: states(d)["extract"] == "succeeded" and states(d)["transform"] == "running",
        )
        assert second["tasks_finished"] > first["tasks_finished"]
        assert second["throughput_per_minute"] > 0
        assert second["avg_latency_ms"] is not None
        assert second["avg_latency_ms"] > 0
        assert stamp(second) > stamp(first)
        extract = next(t for t in second["tasks"] if t["name"] == "extract")
        assert extract["attempts"] == 1
        assert extract["criticality"] == "critical"
        assert extract["duration_ms"] > 0

        run.release("boom")
        third = await poll(session, url, lambda d: states(d)["after_boom"] == "skipped")
        assert states(third)["boom"] == "failed"
        assert third["failures_total"] == 1
        assert third["counts"]["failed"] == 1
        boom = next(t for t in third["tasks"] if t["name"] == "boom")
        assert boom["error"] == f"ValueError: kaput {EVIL}"
        assert stamp(third) > stamp(second)

        # Prometheus mid-run: valid, and (once re-rendered) counts what JSON counts.
        failures = series_key("pipeline_task_failures_total", {"task": "boom"})
        samples, text = await poll_prometheus(session, dash.url, lambda s: s.get(failures) == 1)
        assert samples[series_key("pipeline_tasks_active", {})] >= 1
        check_promtool(promtool_path, text)

        run.release("transform", "slow")
        final = await poll(session, url, lambda d: d["status"] != "running")
        assert run.finish().status.value == final["status"] == "failed"
        assert final["tasks_active"] == 0
        assert final["counts"]["succeeded"] == 7
        assert final["counts"]["failed"] == 1
        assert final["counts"]["skipped"] == 1
        assert final["retries_total"] == 1
        assert next(t for t in final["tasks"] if t["name"] == "flaky")["attempts"] == 2
        assert final["breakers"] == {"warehouse-db": {"value": 0, "state": "closed"}}

        # The sampler filled the chart history on its own, oldest first.
        assert final["tasks_finished"] == 9
        caught_up = await poll(
            session,
            url,
            lambda d: len(d["history"]) >= 3 and d["history"][-1]["tasks_finished"] == 9,
        )
        history = caught_up["history"]
        times = [point["t"] for point in history]
        assert times == sorted(times)
        assert [point["tasks_finished"] for point in history] == sorted(
            point["tasks_finished"] for point in history
        )
        assert set(history[-1]) == {
            "t",
            "throughput_per_minute",
            "avg_latency_ms",
            "recent_latency_ms",
            "tasks_active",
            "tasks_finished",
        }


async def scrape(session: aiohttp.ClientSession, base: str, accept: str | None = None) -> str:
    headers = {"Accept": accept} if accept else {}
    async with session.get(base + "prometheus", headers=headers) as response:
        assert response.status == 200
        expected = "application/openmetrics-text" if accept else "text/plain"
        assert response.headers["Content-Type"].startswith(expected)
        return await response.text()


async def poll_prometheus(
    session: aiohttp.ClientSession,
    base: str,
    condition: Callable[[dict[tuple[str, tuple[tuple[str, str], ...]], float]], bool],
) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], str]:
    """Return the first checked exposition meeting ``condition``; fail after WAIT seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        text = await scrape(session, base)
        samples = check_families(list(text_string_to_metric_families(text)))
        if condition(samples):
            return samples, text
        if loop.time() > deadline:
            pytest.fail(f"condition never met; last exposition:\n{text[:3000]}")
        await asyncio.sleep(0.01)


def check_promtool(promtool: str, text: str) -> None:
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, f"promtool: {checked.stdout}{checked.stderr}"


@pytest.mark.asyncio
async def test_prometheus_exposition_is_valid(run: GatedRun, promtool_path: str) -> None:
    run.start()
    result = run.finish()
    assert result.counts()["succeeded"] == 7

    async with (
        PipelineDashboard(run.optimizer) as dash,
        aiohttp.ClientSession() as session,
    ):
        text = await scrape(session, dash.url)
        samples = check_families(list(text_string_to_metric_families(text)))
        check_promtool(promtool_path, text)

        om_text = await scrape(session, dash.url, accept="application/openmetrics-text")
        assert om_text.endswith("# EOF\n")
        om_samples = check_families(list(om_parser.text_string_to_metric_families(om_text)))

        for series in (samples, om_samples):
            # Both parsers read the odd task names back exactly: escaped, not mangled.
            for name in (EVIL, QUOTED, "extract", "boom"):
                count = series[series_key("pipeline_task_latency_seconds_count", {"task": name})]
                assert count == 1
            assert series[series_key("pipeline_task_failures_total", {"task": "boom"})] == 1
            assert series[series_key("pipeline_task_failures_total", {"task": EVIL})] == 0
            flaky = {"task": "flaky"}
            assert series[series_key("pipeline_task_latency_seconds_count", flaky)] == 2
            assert series[series_key("pipeline_task_retries_total", flaky)] == 1
            breaker = {"breaker": "warehouse-db"}
            assert series[series_key("pipeline_circuit_breaker_state", breaker)] == 0
        assert 'task="say \\"hi\\"\\\\there"' in text

        # Both expositions describe the same series.
        assert {k for k in samples if not k[0].endswith("_created")} >= {
            k for k in om_samples if not k[0].endswith("_created")
        }


@pytest.mark.asyncio
async def test_large_bodies_are_gzipped_when_accepted(run: GatedRun) -> None:
    run.start()
    run.finish()
    async with (
        PipelineDashboard(run.optimizer) as dash,
        aiohttp.ClientSession(auto_decompress=False) as session,
    ):
        url = dash.url + "prometheus"
        async with session.get(url, headers={"Accept-Encoding": "identity"}) as response:
            assert "Content-Encoding" not in response.headers
            assert response.headers["Vary"] == "Accept-Encoding"
            plain = await response.read()
        for accept in ("gzip", "gzip, deflate, br", "br;q=1.0, gzip;q=0.5"):
            async with session.get(url, headers={"Accept-Encoding": accept}) as response:
                assert response.headers["Content-Encoding"] == "gzip", accept
                packed = await response.read()
            assert gzip.decompress(packed) == plain
            assert len(packed) < len(plain) / 4
        async with session.get(url, headers={"Accept-Encoding": "gzip;q=0"}) as response:
            assert "Content-Encoding" not in response.headers


@pytest.mark.asyncio
async def test_json_carries_odd_names_as_inert_data(run: GatedRun) -> None:
    run.start()
    run.finish()
    async with (
        PipelineDashboard(run.optimizer) as dash,
        aiohttp.ClientSession() as session,
        session.get(dash.url + "metrics") as response,
    ):
        body = await response.read()
    assert b"<img" not in body
    assert b"\\u003cimg src=x onerror=alert(1)\\u003e" in body
    document = json.loads(body)
    assert EVIL in states(document)
    assert QUOTED in states(document)


# -- security --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_foreign_host_header_is_refused(optimizer: PipelineOptimizer) -> None:
    async with (
        PipelineDashboard(optimizer, allowed_hosts=["dash.internal"]) as dash,
        aiohttp.ClientSession() as session,
    ):
        port = dash.port
        for host, status in [
            ("evil.example", 403),
            (f"evil.example:{port}", 403),
            (f"127.0.0.1:{port + 1}", 403),
            (f"127.0.0.1:{port}", 200),
            (f"localhost:{port}", 200),
            (f"LOCALHOST:{port}", 200),
            (f"[::1]:{port}", 200),
            ("dash.internal", 200),
            (f"dash.internal:{port}", 200),
        ]:
            for path in ("", "metrics", "prometheus", "healthz"):
                async with session.get(dash.url + path, headers={"Host": host}) as response:
                    assert response.status == status, (host, path)
                    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


def test_non_loopback_bind_needs_a_token(optimizer: PipelineOptimizer) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10", "dashboard.example"):
        with pytest.raises(ValueError, match="not a loopback address"):
            PipelineDashboard(optimizer, host=host)
    # Loopback spellings need none.
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        PipelineDashboard(optimizer, host=host)


@pytest.mark.asyncio
async def test_non_loopback_bind_with_a_token_serves(optimizer: PipelineOptimizer) -> None:
    token = generate_token()
    async with (
        PipelineDashboard(optimizer, host="0.0.0.0", token=token) as dash,
        aiohttp.ClientSession() as session,
    ):
        local = f"http://127.0.0.1:{dash.port}/"
        async with session.get(local + "metrics") as response:
            assert response.status == 401
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(local + "metrics", headers=headers) as response:
            assert response.status == 200
        assert dash.page_url == f"{dash.url}?token={token}"


@pytest.mark.asyncio
async def test_token_is_required_when_set(optimizer: PipelineOptimizer) -> None:
    token = generate_token()
    async with (
        PipelineDashboard(optimizer, token=token) as dash,
        aiohttp.ClientSession() as session,
    ):
        for path in ("", "metrics", "prometheus", "static/app.js", "static/style.css"):
            url = dash.url + path
            async with session.get(url) as response:
                assert response.status == 401, path
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            for headers in (
                {"Authorization": "Bearer wrong"},
                {"X-Pipeopt-Token": token[:-1]},
                {"Authorization": f"Basic {token}"},
            ):
                async with session.get(url, headers=headers) as response:
                    assert response.status == 401, (path, headers)
            async with session.get(url, params={"token": "nope"}) as response:
                assert response.status == 401, path
            for headers in ({"Authorization": f"Bearer {token}"}, {"X-Pipeopt-Token": token}):
                async with session.get(url, headers=headers) as response:
                    assert response.status == 200, (path, headers)
            async with session.get(url, params={"token": token}) as response:
                assert response.status == 200, path

        # Health checks stay open; the page forwards the token to its assets.
        async with session.get(dash.url + "healthz") as response:
            assert response.status == 200
            assert await response.json() == {"status": "ok"}
        async with session.get(dash.page_url) as response:
            page = await response.text()
        assert f'src="/static/app.js?token={token}"' in page
        assert f'href="/static/style.css?token={token}"' in page


@pytest.mark.asyncio
async def test_security_headers_on_every_response(optimizer: PipelineOptimizer) -> None:
    async with (
        PipelineDashboard(optimizer) as dash,
        aiohttp.ClientSession() as session,
    ):
        cases = [
            ("", 200, "text/html"),
            ("metrics", 200, "application/json"),
            ("prometheus", 200, "text/plain"),
            ("healthz", 200, "application/json"),
            ("static/app.js", 200, "text/javascript"),
            ("static/style.css", 200, "text/css"),
            ("static/favicon.svg", 200, "image/svg+xml"),
            ("static/index.html", 404, "application/json"),
            ("static/..%2Fapp.py", 404, "application/json"),
            ("nowhere", 404, None),
        ]
        for path, status, content_type in cases:
            async with session.get(dash.url + path) as response:
                assert response.status == status, path
                headers = response.headers
                if content_type is not None:
                    assert headers["Content-Type"].startswith(content_type), path
                assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
                assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
                assert headers["X-Content-Type-Options"] == "nosniff"
                assert headers["Referrer-Policy"] == "no-referrer"
                assert headers["X-Frame-Options"] == "DENY"
                if path in ("", "metrics", "prometheus", "healthz"):
                    assert headers["Cache-Control"] == "no-store", path
        async with session.head(dash.url + "metrics") as response:
            assert response.status == 200
            assert response.headers["Cache-Control"] == "no-store"
        async with session.get(dash.url) as response:
            page = await response.text()
        # The CSP forbids inline script and style: the page must not need any.
        assert "<script>" not in page
        assert "style=" not in page
        assert "http://" not in page
        assert "https://" not in page


@pytest.mark.asyncio
async def test_dashboard_is_read_only(optimizer: PipelineOptimizer) -> None:
    async with (
        PipelineDashboard(optimizer) as dash,
        aiohttp.ClientSession() as session,
    ):
        for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            for path in ("", "metrics", "prometheus", "healthz", "nowhere"):
                async with session.request(method, dash.url + path, data=b"x") as response:
                    assert response.status == 405, (method, path)
                    assert response.headers["Allow"] == "GET, HEAD"
                    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


# -- lifecycle -------------------------------------------------------------------


def test_runs_on_a_background_thread(optimizer: PipelineOptimizer) -> None:
    dash = PipelineDashboard(optimizer)
    with pytest.raises(RuntimeError, match="not started"):
        _ = dash.port
    with dash:
        assert dash.running
        assert dash.url == f"http://127.0.0.1:{dash.port}/"
        with urllib.request.urlopen(dash.url + "healthz", timeout=5) as response:
            assert json.loads(response.read()) == {"status": "ok"}
        with urllib.request.urlopen(dash.url + "metrics", timeout=5) as response:
            assert json.loads(response.read())["run_id"] is None
        with pytest.raises(RuntimeError, match="already started"):
            dash.start_in_thread()
    assert not dash.running
    dash.stop_in_thread()  # stopping twice is harmless
    # And it can start again, on a new port.
    url = dash.start_in_thread()
    try:
        with urllib.request.urlopen(url + "healthz", timeout=5) as response:
            assert response.status == 200
    finally:
        dash.stop_in_thread()


def test_start_in_thread_reports_bind_errors(optimizer: PipelineOptimizer) -> None:
    with PipelineDashboard(optimizer) as first:
        second = PipelineDashboard(optimizer, port=first.port)
        with pytest.raises(OSError, match="Address already in use"):
            second.start_in_thread()
        assert not second.running


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": -1}, "port must be an integer from 0 to 65535"),
        ({"port": 70000}, "port must be an integer from 0 to 65535"),
        ({"refresh_interval": 0}, "refresh_interval must be a number of seconds > 0"),
        ({"history_seconds": float("nan")}, "history_seconds must be a number of seconds > 0"),
        ({"token": ""}, "token must be a non-empty string"),
        ({"token": "has space"}, "token must be a non-empty string"),
        ({"host": ""}, "host must be a non-empty string"),
    ],
)
def test_bad_parameters_are_refused(
    optimizer: PipelineOptimizer, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        PipelineDashboard(optimizer, **kwargs)


def test_source_must_look_like_an_optimizer() -> None:
    with pytest.raises(TypeError, match="source must have snapshot"):
        PipelineDashboard(object())  # type: ignore[arg-type]
