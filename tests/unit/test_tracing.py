"""OpenTelemetry spans of a run, read back with the SDK's in-memory exporter."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the otel extra and the SDK")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from pipeopt import Pipeline, PipelineOptimizer, RetryPolicy


def test_one_span_per_attempt_under_one_span_per_run() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    calls = {"flaky": 0}

    p = Pipeline("traced")

    @p.task(criticality="critical")
    def extract() -> int:
        return 1

    @p.task(dependencies=["extract"], retry_policy=RetryPolicy(max_attempts=2, base_delay=0))
    def flaky(extract: int) -> int:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("first try fails")
        return extract + 1

    @p.task(criticality="low")
    def broken() -> None:
        raise ValueError("always")

    result = PipelineOptimizer(max_workers=2, tracing=provider).run(p)
    spans = exporter.get_finished_spans()
    runs = [s for s in spans if s.name == "pipeopt.run"]
    assert len(runs) == 1
    run = runs[0]
    assert run.attributes is not None
    assert run.attributes["pipeopt.run_id"] == result.run_id
    assert run.attributes["pipeopt.status"] == "failed"
    assert run.status.status_code is StatusCode.ERROR
    attempts = [s for s in spans if s.name != "pipeopt.run"]
    assert len(attempts) == 4  # extract, flaky twice, broken
    for span in attempts:
        assert span.parent is not None
        assert span.parent.span_id == run.context.span_id
        assert span.context.trace_id == run.context.trace_id
        assert run.start_time is not None
        assert span.start_time is not None
        assert run.end_time is not None
        assert span.end_time is not None
        assert run.start_time <= span.start_time <= span.end_time <= run.end_time
    by_attempt = {
        (s.attributes["pipeopt.task"], s.attributes["pipeopt.attempt"]): s
        for s in attempts
        if s.attributes is not None
    }
    assert set(by_attempt) == {("extract", 1), ("flaky", 1), ("flaky", 2), ("broken", 1)}
    first = by_attempt[("flaky", 1)]
    assert first.attributes is not None
    assert first.attributes["pipeopt.state"] == "retried"
    assert first.status.status_code is StatusCode.ERROR
    assert [e.name for e in first.events] == ["exception"]
    second = by_attempt[("flaky", 2)].attributes
    assert second is not None
    assert second["pipeopt.state"] == "succeeded"
    assert second["pipeopt.criticality"] == "medium"
    broken_span = by_attempt[("broken", 1)]
    assert broken_span.attributes is not None
    assert broken_span.attributes["pipeopt.state"] == "failed"
    assert "ValueError: always" in (broken_span.status.description or "")


def test_tracing_must_be_a_bool_or_a_provider() -> None:
    with pytest.raises(TypeError, match="tracing must be True, False or"):
        PipelineOptimizer(tracing="yes")
