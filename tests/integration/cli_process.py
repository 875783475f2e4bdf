"""Run the real ``pipeopt`` command in a subprocess, as the CLI tests do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_pipeopt(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeopt.cli ARGS`` in ``cwd``; return it finished, whatever its exit code."""
    return subprocess.run(
        [sys.executable, "-m", "pipeopt.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
