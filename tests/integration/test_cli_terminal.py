"""Names and error texts from user code never reach the terminal as escape sequences.

A pipeline whose names and errors carry an OSC title sequence, a clear-screen
sequence and rich markup runs through the real ``pipeopt`` command; every
byte it writes is checked. Output to a pipe has no styling of its own, so
any ESC or BEL byte there came from user data. On a real terminal (a pty)
pipeopt styles its own output, so there the user's sequences are looked for
by content. ``graph`` output is parsed line by line: a name cannot add
diagram lines or HTML.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

OSC = "\\x1b]0;PWNED\\x07"
CLEAR = "\\x1b[2J"

EVIL = f"""
from pipeopt import Pipeline, PipelineTask

pipeline = Pipeline("etl{OSC}[bold]x[/]")


def ok(context):
    context.logger.warning("row {CLEAR}{OSC} skipped")
    return 1


def bad():
    raise ValueError("bad {CLEAR} row\\nsecond line {OSC}")


pipeline.add(PipelineTask("{OSC}title", ok))
pipeline.add(PipelineTask("{CLEAR}clear", bad, dependencies=["{OSC}title"]))
pipeline.add(PipelineTask("[red]markup[/red]", ok))
pipeline.add(PipelineTask('<img src=x onerror=alert(1)>\\nB["x"] --> C;', ok))
pipeline.add(PipelineTask("after\\n}}\\ndigraph x {{", ok, dependencies=["[red]markup[/red]"]))
"""

CYCLE = f"""
from pipeopt import Pipeline, PipelineTask

pipeline = Pipeline("cycle")
pipeline.add(PipelineTask("{OSC}a", print, dependencies=["{CLEAR}b"]))
pipeline.add(PipelineTask("{CLEAR}b", print, dependencies=["{OSC}a"]))
"""


def pipeopt(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pipeopt.cli", *args],
        cwd=cwd,
        capture_output=True,
        timeout=120,
        check=False,
    )


def assert_no_control_bytes(done: subprocess.CompletedProcess[bytes]) -> None:
    for stream in (done.stdout, done.stderr):
        assert b"\x1b" not in stream, stream
        assert b"\x07" not in stream, stream


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "evil.py").write_text(textwrap.dedent(EVIL))
    (tmp_path / "cycle.py").write_text(textwrap.dedent(CYCLE))
    return tmp_path


def test_every_command_shows_escape_sequences_as_text(workdir: Path) -> None:
    run = pipeopt("run", "evil.py", cwd=workdir)
    assert run.returncode == 1, run.stderr
    assert_no_control_bytes(run)
    out = run.stdout.decode()
    assert "\\x1b]0;PWNED\\x07title" in out  # the task is still there, readable
    assert "ValueError: bad \\x1b[2J row\\nsecond line" in out
    assert "[red]markup[/red]" in out  # shown as typed, not applied as markup
    assert "etl\\x1b]0;PWNED\\x07[bold]x[/]" in out
    assert "row \\x1b[2J\\x1b]0;PWNED\\x07 skipped" in run.stderr.decode()  # the task's log

    for args in (
        ["history"],
        ["show", "last", "--tracebacks"],
        ["show", "last", "--json"],
        ["run", "evil.py", "--json"],
        ["graph", "evil.py"],
        ["graph", "evil.py", "--format", "dot"],
    ):
        done = pipeopt(*args, cwd=workdir)
        assert done.returncode in (0, 1), (args, done.stderr)
        assert_no_control_bytes(done)


def test_errors_naming_the_pipeline_stay_one_line(workdir: Path) -> None:
    done = pipeopt("run", "cycle.py", cwd=workdir)
    assert done.returncode == 2
    assert_no_control_bytes(done)
    [line] = done.stderr.decode().splitlines()
    assert "dependency cycle:" in line


def test_the_progress_display_on_a_terminal_shows_names_as_text(workdir: Path) -> None:
    (workdir / "slow.py").write_text(
        textwrap.dedent(f"""
            import time
            from pipeopt import Pipeline

            pipeline = Pipeline("slow{OSC}{CLEAR}")

            @pipeline.task
            def wait():
                time.sleep(0.6)
        """)
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child: pipeopt on a terminal of its own
        os.chdir(workdir)
        os.environ.update({"COLUMNS": "120", "TERM": "xterm-256color"})
        os.environ.pop("NO_COLOR", None)
        os.execv(sys.executable, [sys.executable, "-m", "pipeopt.cli", "run", "slow.py"])
    output = bytearray()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
    text = bytes(output)
    assert b"\x1b[" in text  # a real terminal: pipeopt's own styling is there
    assert b"slow\\x1b]0;PWNED\\x07\\x1b[2J" in text  # the progress bar's label, as text
    assert b"\x1b]0;" not in text
    assert b"\x07" not in text
    assert b"\x1b[2J" not in text


# -- graph -----------------------------------------------------------------------------

MERMAID_LINE = re.compile(
    r"flowchart LR"
    r'|    t\d+\["(?:[^"<>\\;#`\n]|#\d+;)*<br/>[a-z]+"\]:::[a-z]+'
    r"|    t\d+ --> t\d+"
    r"|    classDef [a-z]+ stroke:#[0-9a-f]{6},stroke-width:2px"
)
QUOTED = r'"(?:[^"\\<>\n]|\\.)*"'
DOT_LINE = re.compile(
    rf"digraph {QUOTED} {{"
    r"|    rankdir=LR;"
    r"|    node \[shape=box\];"
    rf"|    t\d+ \[label={QUOTED}\];"
    r"|    t\d+ -> t\d+;"
    r"|}"
)


def test_graph_output_keeps_every_name_inside_its_label(workdir: Path) -> None:
    mermaid = pipeopt("graph", "evil.py", cwd=workdir)
    assert mermaid.returncode == 0, mermaid.stderr
    lines = mermaid.stdout.decode().splitlines()
    for line in lines:
        assert MERMAID_LINE.fullmatch(line), line
    assert sum("<br/>" in line for line in lines) == 5  # one node per task
    assert sum("-->" in line for line in lines) == 2  # the two dependencies only
    assert "<img" not in mermaid.stdout.decode()
    assert "#60;img src#61;x onerror#61;alert#40;1#41;#62;" in mermaid.stdout.decode()

    dot = pipeopt("graph", "evil.py", "--format", "dot", cwd=workdir)
    assert dot.returncode == 0, dot.stderr
    lines = dot.stdout.decode().splitlines()
    for line in lines:
        assert DOT_LINE.fullmatch(line), line
    assert sum("[label=" in line for line in lines) == 5
    assert sum(" -> " in line for line in lines) == 2
    assert lines[0].startswith("digraph")
    assert lines[-1] == "}"
    assert sum(line == "}" for line in lines) == 1
    assert "&lt;img src=x onerror=alert(1)&gt;" in dot.stdout.decode()
