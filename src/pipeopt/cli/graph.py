"""``pipeopt graph FILE[:PIPELINE]``: print the graph as Mermaid or Graphviz DOT.

Nodes carry the task's name and its criticality: the effective label, as
``low → blocker`` when the task inherited it from a task waiting on it. Names come from
user code, so each is escaped for the target language: a name can neither
add diagram lines (newlines, ``;``) nor markup (``<img onerror=...>``), and
node ids are generated (``t0``, ``t1``, ...) so that no two names share one.

A task with a duration estimate shows it on a third line: its
``expected_duration`` (``0.5s, hint``), or with ``--state-dir DIR`` the
duration learned from the runs recorded there (``0.12s, learned (5
samples)``) — what the next run would rank it by.
"""

from __future__ import annotations

import argparse
import sys

from pipeopt.cli.app import PIPELINE_HELP, ExitCode, Parser, clean
from pipeopt.cli.load import load_pipeline
from pipeopt.cli.summary import criticality_text
from pipeopt.estimates import LearnedDurations, estimate_text, plan
from pipeopt.graph import CompiledPipeline, Pipeline
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
    parser.add_argument("pipeline", metavar="FILE[:PIPELINE]", help=PIPELINE_HELP)
    parser.add_argument(
        "--format",
        choices=("mermaid", "dot"),
        default="mermaid",
        help="Mermaid flowchart or Graphviz DOT (mermaid)",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="show the task durations learned from the runs recorded in this run store",
    )
    parser.set_defaults(func=graph)


def mermaid_text(name: str) -> str:
    """Return ``name`` for a quoted Mermaid label: any but ``[\\w .,:/+-]`` as ``#N;``."""
    return "".join(
        ch if ch.isalnum() or ch in _MERMAID_PLAIN else f"#{ord(ch)};" for ch in clean(name)
    )


def dot_text(name: str) -> str:
    """Return ``name`` for the inside of a quoted DOT string (entities for ``<>&``)."""
    return "".join(_DOT_ESCAPES.get(ch, ch) for ch in clean(name))


def _estimates(compiled: CompiledPipeline, learned: LearnedDurations | None) -> list[str]:
    found = plan(compiled, learned)
    return [
        "" if seconds is None else estimate_text(seconds, samples)
        for seconds, samples in zip(found.seconds, found.samples, strict=True)
    ]


def render_mermaid(pipeline: Pipeline, learned: LearnedDurations | None = None) -> str:
    """Return the pipeline as a Mermaid flowchart (effective criticality as classes).

    Each task's duration estimate (its hint, else from ``learned``) is on a third line.
    """
    compiled = pipeline.compile()
    estimates = _estimates(compiled, learned)
    lines = ["flowchart LR"]
    for i, task in enumerate(compiled.tasks):
        level = LABELS[compiled.levels[i]]
        shown = criticality_text(level, task.level.label)
        if estimates[i]:
            shown += f"<br/>{mermaid_text(estimates[i])}"
        lines.append(f'    t{i}["{mermaid_text(task.name)}<br/>{shown}"]:::{level}')
    for i in range(len(compiled.tasks)):
        lines.extend(f"    t{d} --> t{i}" for d in compiled.dependencies[i])
    lines.extend(f"    classDef {k} stroke:{v},stroke-width:2px" for k, v in _COLOURS.items())
    return "\n".join(lines) + "\n"


def render_dot(pipeline: Pipeline, learned: LearnedDurations | None = None) -> str:
    """Return the pipeline as a Graphviz DOT digraph (estimates as in :func:`render_mermaid`)."""
    compiled = pipeline.compile()
    estimates = _estimates(compiled, learned)
    lines = [
        f'digraph "{dot_text(pipeline.name)}" {{',
        "    rankdir=LR;",
        "    node [shape=box];",
    ]
    for i, task in enumerate(compiled.tasks):
        level = criticality_text(LABELS[compiled.levels[i]], task.level.label)
        if estimates[i]:
            level += f"\\n{dot_text(estimates[i])}"
        lines.append(f'    t{i} [label="{dot_text(task.name)}\\n{level}"];')
    for i in range(len(compiled.tasks)):
        lines.extend(f"    t{d} -> t{i};" for d in compiled.dependencies[i])
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph(args: argparse.Namespace) -> int:
    """Print the pipeline's graph as Mermaid or DOT."""
    pipeline = load_pipeline(args.pipeline)
    learned = None
    if args.state_dir is not None:
        from pipeopt.store import RunStore

        with RunStore(args.state_dir, read_only=True) as store:
            learned = store.learned_durations(pipeline.name)
    render = render_dot if args.format == "dot" else render_mermaid
    text = render(pipeline, learned)
    sys.stdout.write(text)
    return ExitCode.OK
