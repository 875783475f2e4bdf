"""Real Prometheus servers from Debian on loopback: a Pushgateway and a scraping server.

The tests start the binaries themselves (paths from ``PIPEOPT_PUSHGATEWAY`` /
``PIPEOPT_PROMETHEUS``, or ``.ci/.tools``) on free loopback ports, and read
back what they received over their HTTP APIs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeopt import Pipeline, PipelineOptimizer

WAIT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_until(check: Callable[[], Any], what: str) -> Any:
    """Return ``check()``'s first truthy value, polling for up to WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def ready(url: str) -> bool:
    with urllib.request.urlopen(url + "/-/ready", timeout=2) as response:
        return response.status == 200


def start_server(argv: list[str], url: str, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    try:
        wait_until(lambda: server.poll() is None and ready(url), f"{argv[0]} to be ready")
    except BaseException:
        server.kill()
        server.wait(5)
        raise AssertionError(f"{argv[0]} did not start: {log.read_text()[-2000:]}") from None
    return server


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(5)


@pytest.fixture
def pushgateway(pushgateway_path: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [pushgateway_path, f"--web.listen-address=127.0.0.1:{port}"]
    server = start_server(argv, url, tmp_path / "pushgateway.log")
    try:
        yield url
    finally:
        stop_server(server)


def test_pushgateway_receives_the_final_metrics_of_a_run(pushgateway: str) -> None:
    p = Pipeline("nightly-etl")
    p.task(name="extract", criticality="critical")(lambda: 1)

    @p.task(dependencies=["extract"])
    def load(extract: int) -> int:
        raise ValueError("warehouse refused")

    optimizer = PipelineOptimizer(max_workers=2, push_gateway=pushgateway)
    result = optimizer.run(p)
    assert result.status.value == "failed"  # a failed run is pushed too

    groups = get_json(pushgateway + "/api/v1/metrics")["data"]
    ours = [g for g in groups if g["labels"].get("job") == "nightly-etl"]
    assert len(ours) == 1
    group = ours[0]
    assert group["labels"]["run"] == result.run_id
    runs = group["pipeline_runs_total"]["metrics"]
    assert [(m["labels"]["status"], float(m["value"])) for m in runs] == [("failed", 1.0)]
    failures = {
        m["labels"]["task"]: float(m["value"])
        for m in group["pipeline_task_failures_total"]["metrics"]
    }
    assert failures == {"extract": 0.0, "load": 1.0}
    assert all(
        m["labels"]["pipeline"] == "nightly-etl"
        for m in group["pipeline_task_failures_total"]["metrics"]
    )
    # A second run is a second group: runs do not overwrite each other.
    second = optimizer.run(p)
    groups = get_json(pushgateway + "/api/v1/metrics")["data"]
    runs_seen = {g["labels"]["run"] for g in groups if g["labels"].get("job") == "nightly-etl"}
    assert runs_seen == {result.run_id, second.run_id}


@pytest.mark.slow
def test_prometheus_scrapes_a_live_run_and_answers_promql(
    prometheus_path: str, tmp_path: Path
) -> None:
    pytest.importorskip("aiohttp", reason="the dashboard needs aiohttp: pipeopt[dashboard]")
    from pipeopt.dashboard import PipelineDashboard

    gate = threading.Event()
    p = Pipeline("scraped")

    def hold() -> str:
        assert gate.wait(WAIT), "the test never opened the gate"
        return "held"

    for i in range(3):
        p.task(name=f"quick{i}", group="quick")(lambda: 1)
    p.task(name="held", criticality="critical")(hold)
    optimizer = PipelineOptimizer(max_workers=4)
    with PipelineDashboard(optimizer) as dash:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 200ms\n"
            "  scrape_timeout: 150ms\n"
            "scrape_configs:\n"
            "  - job_name: pipeopt\n"
            "    metrics_path: /prometheus\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{dash.port}']\n"
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [
            prometheus_path,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        server = start_server(argv, url, tmp_path / "prometheus.log")
        try:

            def query(promql: str) -> list[Any]:
                encoded = urllib.parse.urlencode({"query": promql})
                answer = get_json(f"{url}/api/v1/query?{encoded}")
                assert answer["status"] == "success", answer
                return list(answer["data"]["result"])

            outcome: list[Any] = []
            runner = threading.Thread(target=lambda: outcome.append(optimizer.run(p)))
            runner.start()
            try:
                # During the run: the held task shows up as one active attempt.
                active = wait_until(
                    lambda: query('pipeline_tasks_active{pipeline="scraped"} == 1'),
                    "Prometheus to see the running task",
                )
                assert active[0]["metric"]["job"] == "pipeopt"
            finally:
                gate.set()
                runner.join(WAIT)
            assert outcome, "the run did not finish"
            assert outcome[0].ok
            finished = wait_until(
                lambda: query(
                    'sum by (group) (pipeline_task_latency_seconds_count{pipeline="scraped"})'
                ),
                "Prometheus to see the finished attempts",
            )
            counts = {r["metric"].get("group"): float(r["value"][1]) for r in finished}
            wait_until(
                lambda: (
                    {
                        r["metric"].get("group"): float(r["value"][1])
                        for r in query(
                            "sum by (group) "
                            '(pipeline_task_latency_seconds_count{pipeline="scraped"})'
                        )
                    }
                    == {"quick": 3.0, "critical": 1.0}
                ),
                f"every attempt counted (last seen {counts})",
            )
            up = query('up{job="pipeopt"}')
            assert [float(r["value"][1]) for r in up] == [1.0]
        finally:
            stop_server(server)


def test_pipeopt_run_pushes_to_the_gateway(pushgateway: str, tmp_path: Path) -> None:
    import sys

    (tmp_path / "nightly.py").write_text(
        "from pipeopt import Pipeline\n"
        "pipeline = Pipeline('cli-pushed')\n"
        "@pipeline.task\n"
        "def extract():\n"
        "    return 1\n"
    )
    argv = [sys.executable, "-m", "pipeopt.cli", "run", "nightly.py", "--no-state"]
    done = subprocess.run(
        [*argv, "--push-gateway", pushgateway],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    groups = get_json(pushgateway + "/api/v1/metrics")["data"]
    ours = [g for g in groups if g["labels"].get("job") == "cli-pushed"]
    assert len(ours) == 1
    runs = ours[0]["pipeline_runs_total"]["metrics"]
    assert [(m["labels"]["status"], float(m["value"])) for m in runs] == [("succeeded", 1.0)]
