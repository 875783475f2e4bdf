"""The metrics page lists exactly the families, types and labels an optimizer's registry exports."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from pipeopt import CircuitBreaker, Pipeline, PipelineOptimizer, TaskContext
from pipeopt.metrics import CUSTOM_SERIES_LIMIT, GROUP_LIMIT, LATENCY_BUCKETS, TASK_SERIES_LIMIT

PAGE = Path(__file__).resolve().parents[2] / "docs" / "observability" / "metrics.md"
ROW = re.compile(r"^\| `(pipeline_\w+)` \| (\w+) \| ([^|]+) \|")


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    section = PAGE.read_text(encoding="utf-8").split("## Every metric", 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[str, frozenset[str]]] = {}
    for line in section.splitlines():
        found = ROW.match(line)
        if found:
            name, kind, labels = found.groups()
            table[name] = (kind, frozenset(re.findall(r"`(\w+)`", labels)))
    return table


def exported() -> dict[str, tuple[str, frozenset[str]]]:
    """Run a pipeline that touches every family; return what the registry holds."""
    pipeline = Pipeline("docs")

    @pipeline.task(circuit_breaker=CircuitBreaker(name="api"))
    def load(context: TaskContext) -> None:
        context.record_custom_metric("rows", 1)
        context.record_batch(10, 0.01)

    registry = CollectorRegistry()
    PipelineOptimizer(max_workers=1, registry=registry).run(pipeline)
    families: dict[str, tuple[str, frozenset[str]]] = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        families[name] = (family.type, labels)
    return families


def test_the_metrics_table_matches_the_registry() -> None:
    assert documented() == exported()


def test_the_limits_and_buckets_on_the_page_match_the_code() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert f"Up to **{TASK_SERIES_LIMIT} tasks**" in text
    assert f"At most **{GROUP_LIMIT} groups**" in text
    assert f"At most **{CUSTOM_SERIES_LIMIT}** custom-metric series" in text
    buckets = ", ".join(f"{b * 1000:g} ms" if b < 1 else f"{b:g} s" for b in LATENCY_BUCKETS)
    assert f"buckets `pipeopt.metrics.LATENCY_BUCKETS`: {buckets}." in " ".join(text.split())
