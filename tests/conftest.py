"""Shared fixtures: the real PostgreSQL, the real browser, helpers for subprocesses.

Tests that need PostgreSQL, Chromium or the Prometheus servers skip with a
reason on a machine without them; CI sets ``PIPEOPT_REQUIRE_POSTGRES=1`` /
``PIPEOPT_REQUIRE_BROWSER=1`` / ``PIPEOPT_REQUIRE_PROMETHEUS=1`` so that there
they fail instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def missing(requirement_env: str, reason: str) -> None:
    """Skip the test with ``reason``, or fail it when ``requirement_env`` is set to 1."""
    if os.environ.get(requirement_env) == "1":
        pytest.fail(f"{reason} ({requirement_env}=1 requires it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """Return the DSN of a reachable PostgreSQL, or skip/fail."""
    dsn = os.environ.get("PIPEOPT_TEST_POSTGRES_DSN", DEFAULT_DSN)
    try:
        import psycopg
    except ImportError:
        missing(
            "PIPEOPT_REQUIRE_POSTGRES", "psycopg is not installed: pip install 'pipeopt[postgres]'"
        )
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        missing("PIPEOPT_REQUIRE_POSTGRES", f"PostgreSQL at {dsn} is not reachable: {exc}")
    return dsn


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Return the path of Debian's chromium, or skip/fail."""
    path = "/usr/bin/chromium"
    if not Path(path).exists():
        missing("PIPEOPT_REQUIRE_BROWSER", f"{path} is missing: apt-get install chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("PIPEOPT_REQUIRE_BROWSER", "playwright is not installed: pip install playwright")
    return path


@pytest.fixture(scope="session")
def promtool_path() -> str:
    """Return the path of promtool, or skip/fail."""
    path = os.environ.get("PIPEOPT_PROMTOOL") or shutil.which("promtool")
    local = ROOT / ".ci" / ".tools" / "usr" / "bin" / "promtool"
    if not path and local.exists():
        path = str(local)
    if not path or not Path(path).exists():
        missing("PIPEOPT_REQUIRE_PROMTOOL", "promtool is not available (see .ci/run)")
    assert path is not None
    return path


def _debian_tool(env: str, name: str) -> str:
    path = os.environ.get(env) or shutil.which(name)
    local = ROOT / ".ci" / ".tools" / "usr" / "bin" / name
    if not path and local.exists():
        path = str(local)
    if not path or not Path(path).exists():
        missing(
            "PIPEOPT_REQUIRE_PROMETHEUS",
            f"{name} is not available: set {env}, or extract Debian's package as .ci/run does",
        )
    assert path is not None
    return path


@pytest.fixture(scope="session")
def prometheus_path() -> str:
    """Return the path of a Prometheus server binary, or skip/fail."""
    return _debian_tool("PIPEOPT_PROMETHEUS", "prometheus")


@pytest.fixture(scope="session")
def pushgateway_path() -> str:
    """Return the path of a Prometheus Pushgateway binary, or skip/fail."""
    return _debian_tool("PIPEOPT_PUSHGATEWAY", "prometheus-pushgateway")


@pytest.fixture
def pipeopt_cmd() -> list[str]:
    """Return the argv prefix that runs the real ``pipeopt`` command."""
    return [sys.executable, "-m", "pipeopt.cli"]


@pytest.fixture
def artifacts_dir() -> Path:
    """Return the folder where tests save artifacts such as screenshots."""
    path = ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path
