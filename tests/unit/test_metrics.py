"""Bounded Prometheus series: groups, folding, the pipeline label; Pushgateway settings."""

from __future__ import annotations

import logging
import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pipeopt import Pipeline, PipelineOptimizer, PipelineTask
from pipeopt.metrics import (
    FOLDED_TASK,
    GROUP_LIMIT,
    OTHER_GROUP,
    TASK_SERIES_LIMIT,
    SeriesLabels,
    check_push_gateway,
    push_run_metrics,
    task_group,
    task_groups,
)


def series_of(registry: CollectorRegistry) -> list[tuple[str, dict[str, str]]]:
    return [
        (sample.name, dict(sample.labels))
        for family in registry.collect()
        for sample in family.samples
    ]


def test_group_is_declared_then_mapped_item_then_criticality() -> None:
    assert task_group(PipelineTask("a", lambda: 1, group="loads")) == "loads"
    assert task_group(PipelineTask("fetch[12]", lambda: 1)) == "fetch"
    assert task_group(PipelineTask("b", lambda: 1, criticality="critical")) == "critical"


def test_group_must_be_a_non_empty_string() -> None:
    with pytest.raises(ValueError, match="group must be a non-empty string"):
        PipelineTask("a", lambda: 1, group="  ")


def test_small_pipeline_has_series_per_task_with_pipeline_and_group() -> None:
    p = Pipeline("small")
    p.task(name="load", group="warehouse")(lambda: 1)
    p.task(name="check", criticality="high")(lambda: 1)
    registry = CollectorRegistry()
    PipelineOptimizer(max_workers=2, registry=registry).run(p)
    get = registry.get_sample_value
    labels = {"pipeline": "small", "group": "warehouse", "task": "load"}
    assert get("pipeline_task_latency_seconds_count", labels) == 1
    assert get("pipeline_task_failures_total", {**labels, "group": "high", "task": "check"}) == 0
    assert get("pipeline_runs_total", {"pipeline": "small", "status": "succeeded"}) == 1
    for name, sample_labels in series_of(registry):
        assert sample_labels.get("pipeline") == "small", (name, sample_labels)


@pytest.mark.slow
def test_a_10000_task_run_exposes_at_most_500_series() -> None:
    p = Pipeline("huge")
    labels = ("blocker", "critical", "high", "medium", "low", "deferred")
    for i in range(10_000):
        # 30 declared groups: more than the limit, so some fold into "other".
        group = f"g{i % 30}" if i % 2 else None
        p.add(PipelineTask(f"t{i}", int, criticality=labels[i % 6], group=group))
    registry = CollectorRegistry()
    optimizer = PipelineOptimizer(max_workers=4, registry=registry)
    assert optimizer.run(p).ok
    series = series_of(registry)
    assert len(series) <= 500, len(series)
    assert all(labels.get("pipeline") == "huge" for _, labels in series)
    task_series = [lab for name, lab in series if name == "pipeline_task_failures_total"]
    assert {lab["task"] for lab in task_series} == {FOLDED_TASK}
    groups = {lab["group"] for lab in task_series}
    assert len(groups) == GROUP_LIMIT + 1
    assert OTHER_GROUP in groups
    # Folding loses no attempt: the counts add up to every task.
    total = sum(
        registry.get_sample_value("pipeline_task_latency_seconds_count", lab) or 0
        for lab in task_series
    )
    assert total == 10_000
    assert b"huge" in generate_latest(registry)


def test_folding_starts_above_the_documented_task_count() -> None:
    p = Pipeline("edge")
    for i in range(TASK_SERIES_LIMIT + 1):
        p.add(PipelineTask(f"t{i}", int, group="same"))
    registry = CollectorRegistry()
    PipelineOptimizer(max_workers=2, registry=registry).run(p)
    labels = {"pipeline": "edge", "group": "same", "task": FOLDED_TASK}
    assert registry.get_sample_value("pipeline_task_latency_seconds_count", labels) == 101


def test_custom_metrics_are_summed_over_a_folded_group() -> None:
    p = Pipeline("sums")

    def body(context: object) -> None:
        context.record_custom_metric("rows", 2)  # type: ignore[attr-defined]

    for i in range(TASK_SERIES_LIMIT + 5):
        p.add(PipelineTask(f"t{i}", body, group="loads"))
    registry = CollectorRegistry()
    PipelineOptimizer(max_workers=2, registry=registry).run(p)
    labels = {"pipeline": "sums", "group": "loads", "task": FOLDED_TASK, "name": "rows"}
    assert registry.get_sample_value("pipeline_task_custom_metric", labels) == 2 * 105


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:9091", "http://127.0.0.1:9091"),
        ("127.0.0.1:9091", "http://127.0.0.1:9091"),
        ("https://push.example/", "https://push.example"),
    ],
)
def test_push_gateway_addresses(given: str, expected: str) -> None:
    assert check_push_gateway(given) == expected


@pytest.mark.parametrize("bad", ["", "ftp://x:1", "http://", 9091, "http://h:99999"])
def test_bad_push_gateway_is_refused_early(bad: object) -> None:
    with pytest.raises(ValueError, match="push_gateway"):
        PipelineOptimizer(push_gateway=bad)  # type: ignore[arg-type]


def test_unreachable_gateway_is_logged_and_the_run_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = Pipeline("pushed")
    p.task(name="a")(lambda: 1)
    optimizer = PipelineOptimizer(max_workers=1, push_gateway=f"http://127.0.0.1:{port}")
    with caplog.at_level(logging.ERROR, logger="pipeopt.metrics"):
        result = optimizer.run(p)
    assert result.ok
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeopt.metrics"]
    assert len(messages) == 1
    assert f"127.0.0.1:{port}" in messages[0]
    assert result.run_id in messages[0]
    assert not push_run_metrics(
        optimizer.registry, f"http://127.0.0.1:{port}", pipeline="p", run_id="r", timeout=2
    )


def test_folded_labels_share_one_key_per_group_and_are_found_by_name() -> None:
    p = Pipeline("wide")
    p.add_many([f"t{i}" for i in range(150)], lambda: 1, criticality="low")
    p.add_many([f"g{i}" for i in range(50)], lambda: 1, group="loads")
    p.add(PipelineTask("item[3]", lambda: 1))
    compiled = p.compile()
    assert task_groups(compiled) is task_groups(compiled)  # once per compiled pipeline
    labels = SeriesLabels.of(compiled)
    assert labels.keys == (("wide", "low", "*"), ("wide", "loads", "*"), ("wide", "item", "*"))
    assert labels.per_task[0] is labels.per_task[149]
    assert labels.of_task("g7") == ("wide", "loads", "*")
    assert labels.of_task("nope") is None
