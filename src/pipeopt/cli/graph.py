"""``pipeopt graph FILE[:PIPELINE]``: print the graph as Mermaid or Graphviz DOT.

Nodes carry the task's name and its criticality: the effective label, as
``low → blocker`` when the task inherited it from a task waiting on it. Names come from
user code, so each is escaped for the target language: a name can neither
add diagram lines (newlines, ``;``) nor markup (``<img onerror=...>``), and
node ids are generated (``t0``, ``t1``, ...) so that no two names share one.
"""

from __future__ import annotations

import argparse
import sys

from pipeopt.cli.app import ExitCode, Parser, clean
from pipeopt.cli.load import load_pipeline
from pipeopt.cli.summary import criticality_text
from pipeopt.graph import Pipeline
from pipeopt.priority import LABELS

_COLOURS = {
    "blocker": "#b91c1c",
    "critical": "#ea580c",
    "high": "#ca8a04",
    "medium": "#2563eb",
    "low": "#64748b",
    "deferred": "#94a3b8",
}
_MERMAID_PLAIN = frozenset(" _.,:/+-")
_DOT_ESCAPES = {"\\": "\\\\", '"': '\\"', "&": "&amp;", "<": "&lt;", ">": "&gt;"}


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add ``graph``."""
    parser = commands.add_parser("graph", help="print a pipeline's graph (Mermaid or DOT)")
    parser.add_argument("pipeline", metavar="FILE[:PIPELINE]")
    parser.add_argument("--format", choices=("mermaid", "dot"), default="mermaid")
    parser.set_defaults(func=graph)


def mermaid_text(name: str) -> str:
    """Return ``name`` for a quoted Mermaid label: any but ``[\\w .,:/+-]`` as ``#N;``."""
    return "".join(
        ch if ch.isalnum() or ch in _MERMAID_PLAIN else f"#{ord(ch)};" for ch in clean(name)
    )


def dot_text(name: str) -> str:
    """Return ``name`` for the inside of a quoted DOT string (entities for ``<>&``)."""
    return "".join(_DOT_ESCAPES.get(ch, ch) for ch in clean(name))


def render_mermaid(pipeline: Pipeline) -> str:
    """Return the pipeline as a Mermaid flowchart (effective criticality as classes)."""
    compiled = pipeline.compile()
    lines = ["flowchart LR"]
    for i, task in enumerate(compiled.tasks):
        level = LABELS[compiled.levels[i]]
        shown = criticality_text(level, task.level.label)
        lines.append(f'    t{i}["{mermaid_text(task.name)}<br/>{shown}"]:::{level}')
    for i in range(len(compiled.tasks)):
        lines.extend(f"    t{d} --> t{i}" for d in compiled.dependencies[i])
    lines.extend(f"    classDef {k} stroke:{v},stroke-width:2px" for k, v in _COLOURS.items())
    return "\n".join(lines) + "\n"


def render_dot(pipeline: Pipeline) -> str:
    """Return the pipeline as a Graphviz DOT digraph."""
    compiled = pipeline.compile()
    lines = [
        f'digraph "{dot_text(pipeline.name)}" {{',
        "    rankdir=LR;",
        "    node [shape=box];",
    ]
    for i, task in enumerate(compiled.tasks):
        level = criticality_text(LABELS[compiled.levels[i]], task.level.label)
        lines.append(f'    t{i} [label="{dot_text(task.name)}\\n{level}"];')
    for i in range(len(compiled.tasks)):
        lines.extend(f"    t{d} -> t{i};" for d in compiled.dependencies[i])
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph(args: argparse.Namespace) -> int:
    """Print the pipeline's graph as Mermaid or DOT."""
    pipeline = load_pipeline(args.pipeline)
    text = render_dot(pipeline) if args.format == "dot" else render_mermaid(pipeline)
    sys.stdout.write(text)
    return ExitCode.OK
