"""OpenTelemetry spans for runs: one span per run, one child span per task attempt.

Needs the ``otel`` extra (``pip install 'pipeopt[otel]'``: the OpenTelemetry
API; add the SDK and an exporter of your choice to send spans somewhere).

Spans are made from the finished :class:`~pipeopt.RunResult` with the
attempts' recorded start and end times, so tracing costs the run nothing
while it goes; a run's spans reach the exporter when the run ends (a run
whose process dies leaves no spans, its attempts are in the run store).

Span ``pipeopt.run`` (attributes ``pipeopt.pipeline``, ``pipeopt.run_id``,
``pipeopt.status``, ``pipeopt.tasks``) has one child per attempt, named
after the task, with ``pipeopt.task``, ``pipeopt.criticality``,
``pipeopt.attempt`` (1-based) and ``pipeopt.state`` (``succeeded``,
``failed`` or ``retried``); failed attempts carry an error status and the
exception as an event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeopt.result import RunResult

_INSTALL_HINT = "tracing needs OpenTelemetry; install it with: pip install 'pipeopt[otel]'"


def _trace_api() -> Any:
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return trace


def check_tracing(tracing: object) -> Any:
    """Return the tracer provider ``tracing`` asks for, or None when it is off.

    ``True`` means OpenTelemetry's global provider; a ``TracerProvider``
    (anything with ``get_tracer``) is used as is.

    Raises:
        ImportError: tracing is on but OpenTelemetry is not installed.
        TypeError: ``tracing`` is neither a bool nor a tracer provider.
    """
    if tracing is None or tracing is False:
        return None
    trace = _trace_api()
    if tracing is True:
        return trace.get_tracer_provider()
    if callable(getattr(tracing, "get_tracer", None)):
        return tracing
    raise TypeError(
        "tracing must be True, False or an OpenTelemetry TracerProvider, "
        f"got {type(tracing).__name__}"
    )


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def export_run(result: RunResult, provider: Any) -> None:
    """Emit the spans of ``result`` through ``provider`` (an OpenTelemetry ``TracerProvider``)."""
    trace = _trace_api()
    from opentelemetry.trace import Status, StatusCode

    tracer = provider.get_tracer("pipeopt")
    run_span = tracer.start_span(
        "pipeopt.run",
        start_time=_ns(result.started_at),
        attributes={
            "pipeopt.pipeline": result.pipeline,
            "pipeopt.run_id": result.run_id,
            "pipeopt.status": result.status.value,
            "pipeopt.tasks": len(result.tasks),
        },
    )
    parent = trace.set_span_in_context(run_span)
    for outcome in result.tasks.values():
        history = outcome.attempt_history
        for k, record in enumerate(history):
            if record.error is None:
                state = "succeeded"
            elif k < len(history) - 1:
                state = "retried"
            else:
                state = "failed"
            span = tracer.start_span(
                outcome.name,
                context=parent,
                start_time=_ns(record.started_at),
                attributes={
                    "pipeopt.task": outcome.name,
                    "pipeopt.criticality": outcome.criticality,
                    "pipeopt.attempt": record.number,
                    "pipeopt.state": state,
                },
            )
            ended = _ns(record.started_at + record.duration)
            if record.error is not None:
                span.record_exception(record.error, timestamp=ended)
                span.set_status(
                    Status(StatusCode.ERROR, f"{type(record.error).__name__}: {record.error}")
                )
            span.end(end_time=ended)
    if not result.ok:
        run_span.set_status(Status(StatusCode.ERROR, f"run {result.status.value}"))
    run_span.end(end_time=_ns(result.started_at + result.wall_time))
