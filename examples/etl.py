"""A small ETL pipeline for `pipeopt run examples/etl.py`."""

from __future__ import annotations

import time

from pipeopt import Pipeline, PipelineTask, TaskContext
from pipeopt.retry import RetryPolicy

pipeline = Pipeline("example-etl", description="extract, transform and load sample orders")


@pipeline.task(criticality="critical")
def extract_orders() -> list[dict[str, float]]:
    """Pretend to read orders from an API."""
    time.sleep(0.05)
    return [{"id": i, "amount": 10.0 + i} for i in range(100)]


@pipeline.task(criticality="low")
def extract_fx_rates() -> dict[str, float]:
    """Pretend to read exchange rates."""
    time.sleep(0.05)
    return {"EUR": 1.1, "GBP": 1.3}


@pipeline.task(dependencies=[extract_orders, extract_fx_rates])
def transform(extract_orders: list[dict[str, float]], extract_fx_rates: dict[str, float]) -> float:
    """Convert order amounts to euros and total them."""
    return sum(o["amount"] for o in extract_orders) / extract_fx_rates["EUR"]


def _flaky_publish(transform: float, context: TaskContext) -> str:
    # The first attempt fails: the retry policy runs it again. The attempt
    # number, not a module global, says which try this is, so the task
    # behaves the same on every executor (worker processes have their own
    # globals).
    if context.attempt == 1:
        raise ConnectionError("report service hiccup")
    context.logger.info("publishing a total of %.2f", transform)
    return f"total={transform:.2f}"


pipeline.add(
    PipelineTask(
        "publish",
        _flaky_publish,
        dependencies=["transform"],
        criticality="blocker",
        retry_policy=RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2),
    )
)
