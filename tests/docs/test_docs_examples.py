"""Every ```python block of the docs and the README, and every file in examples/, runs.

The blocks of one page run in order in one namespace (``__name__`` is
``"__main__"``), in a fresh temporary working directory, in a child process
of their own. A block preceded by ``<!-- requires: postgres -->`` (or
``dask``) needs that service: without it the page's remaining blocks are
skipped, or fail under ``PIPEOPT_REQUIRE_POSTGRES=1``, as the other tests do.
An example file says the same with a ``# requires: postgres`` line.
Tracebacks point at the page's own line numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SERVICES = ("postgres", "dask")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\n`]*)$")
_REQUIRES = re.compile(r"^\s*<!--\s*requires:\s*(?P<names>[\w, ]+?)\s*-->\s*$")
_EXAMPLE_REQUIRES = re.compile(r"^#\s*requires:\s*(?P<names>[\w, ]+?)\s*$", re.MULTILINE)

# Executes each block compiled with the page as its file name, padded so that
# tracebacks show the page's line numbers.
_RUNNER = """
import json, sys
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
for block in blocks:
    code = compile("\\n" * (block["line"] - 1) + block["source"], block["page"], "exec")
    exec(code, namespace)
"""


@dataclass(frozen=True)
class Block:
    """One ```python block: where it starts and what it needs."""

    page: str
    line: int
    source: str
    requires: tuple[str, ...]


def _requirements(text: str, where: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SERVICES]
    assert not unknown, f"{where}: unknown requirement {unknown}; use {', '.join(SERVICES)}"
    return names


def python_blocks(text: str, page: str) -> list[Block]:
    """Return the ```python blocks of a Markdown text, in order."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        start = index + 1
        end = start
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and lines[end].strip().strip(fence[0]) == ""
        ):
            end += 1
        language = opening["info"].split()[0].lower() if opening["info"].strip() else ""
        if language in ("python", "py"):
            previous = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            marker = _REQUIRES.match(previous)
            requires = _requirements(marker["names"], f"{page}:{index}") if marker else ()
            body = [
                line[len(indent) :] if line.startswith(indent) else line
                for line in lines[start:end]
            ]
            blocks.append(Block(page, start + 1, textwrap.dedent("\n".join(body)) + "\n", requires))
        index = end + 1
    return blocks


def _check(service: str, request: pytest.FixtureRequest) -> None:
    """Skip (or fail under PIPEOPT_REQUIRE_*) unless ``service`` is available."""
    if service == "postgres":
        request.getfixturevalue("postgres_dsn")
    elif service == "dask":
        pytest.importorskip("distributed")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.setdefault("PIPEOPT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    return env


def _run(argv: list[str], cwd: Path, what: str) -> None:
    done = subprocess.run(
        argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stderr[-4000:]}"


def page_blocks(path: Path) -> list[Block]:
    """Return the ```python blocks of a file (named by its full path, for tracebacks)."""
    return python_blocks(path.read_text(encoding="utf-8"), str(path))


PAGES_WITH_CODE = [page for page in PAGES if page_blocks(page)]


@pytest.mark.parametrize(
    "page", PAGES_WITH_CODE, ids=[str(page.relative_to(ROOT)) for page in PAGES_WITH_CODE]
)
def test_page_code_runs(page: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = page_blocks(page)
    runnable = []
    missing = None
    for block in blocks:
        try:
            for service in block.requires:
                _check(service, request)
        except pytest.skip.Exception as exc:
            missing = f"{block.page}:{block.line} and the blocks after it: {exc}"
            break
        runnable.append(block)
    blocks_file = tmp_path / "blocks.json"
    blocks_file.write_text(json.dumps([block.__dict__ for block in runnable]), encoding="utf-8")
    work = tmp_path / "cwd"
    work.mkdir()
    _run([sys.executable, "-c", _RUNNER, str(blocks_file)], work, page.name)
    if missing:
        pytest.skip(missing)


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_example_runs(example: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    marker = _EXAMPLE_REQUIRES.search(example.read_text(encoding="utf-8"))
    for service in _requirements(marker["names"], example.name) if marker else ():
        _check(service, request)
    _run([sys.executable, str(example)], tmp_path, example.name)


def test_blocks_are_found_with_their_requirements() -> None:
    text = """# probe

```python
x = 1
```

<!-- requires: postgres -->
```python
y = x + 1
```

!!! note
    ```python
    z = 3
    ```

```bash
echo not python
```
"""
    blocks = python_blocks(text, "probe.md")
    assert [(b.line, b.source, b.requires) for b in blocks] == [
        (4, "x = 1\n", ()),
        (9, "y = x + 1\n", ("postgres",)),
        (14, "z = 3\n", ()),
    ]
