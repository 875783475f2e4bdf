"""``pipeopt run FILE[:PIPELINE]``: run a pipeline with progress, a summary and a record."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pipeopt.cli import options
from pipeopt.cli.app import (
    MAX_WORKERS,
    PIPELINE_HELP,
    Parser,
    add_state_dir_option,
    int_range,
    state_dir,
)
from pipeopt.cli.load import load_pipeline, source_of
from pipeopt.cli.session import add_dashboard_options, run_session
from pipeopt.errors import UsageError
from pipeopt.executors.registry import EXECUTOR_NAMES, create_executor

if TYPE_CHECKING:
    from pipeopt.optimizer import PipelineOptimizer


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add ``run``."""
    parser = commands.add_parser("run", help="run a pipeline: FILE[:PIPELINE]")
    parser.add_argument("pipeline", metavar="FILE[:PIPELINE]", help=PIPELINE_HELP)
    add_run_options(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_state_dir_option(parser, optional=True)
    add_dashboard_options(parser)
    parser.set_defaults(func=run)


def add_run_options(parser: argparse.ArgumentParser, *, inherit: bool = False) -> None:
    """Add ``--workers``, ``--executor``, ``--dask-address`` and ``--fail-fast``.

    With ``inherit`` (``resume``), leaving out workers or executor keeps the
    recorded run's.
    """
    default = "default: as the run" if inherit else None
    parser.add_argument(
        "--workers",
        "-w",
        type=int_range(1, MAX_WORKERS),
        default=None,
        help=(default or "task bodies at once (default: min(32, CPUs + 4))")
        + f"; ${options.WORKERS_ENV}",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTOR_NAMES,
        default=None,
        help=(default or "where task bodies run (thread)") + f"; ${options.EXECUTOR_ENV}",
    )
    parser.add_argument(
        "--dask-address", default=None, help="tcp://host:port of a dask scheduler (--executor dask)"
    )
    parser.add_argument(
        "--fail-fast",
        action="store_true",
        help=f"cancel the rest on a failure; ${options.FAIL_FAST_ENV}",
    )
    options.add_param_option(parser)
    options.add_log_level_option(parser)
    options.add_setting_options(parser)
    parser.add_argument(
        "--push-gateway",
        metavar="URL",
        default=None,
        help="push the run's final metrics to this Prometheus Pushgateway (job: the pipeline)",
    )


def make_optimizer(
    args: argparse.Namespace, *, workers: int | None, executor: str
) -> PipelineOptimizer:
    """Return the optimizer the options ask for, recording into the state dir.

    Raises:
        UsageError: an option the optimizer refuses.
    """
    from pipeopt.optimizer import PipelineOptimizer

    if args.dask_address and executor != "dask":
        raise UsageError("--dask-address needs --executor dask")
    try:
        return PipelineOptimizer(
            max_workers=workers,
            executor=create_executor(executor, address=args.dask_address),
            fail_fast=options.fail_fast(args),
            state_dir=state_dir(args),
            **options.optimizer_settings(args),
            push_gateway=args.push_gateway,
        )
    except ImportError as exc:
        raise UsageError(f"--executor {executor}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run a pipeline file; exit 0 if every task succeeded, 1 if one did not."""
    from pipeopt.optimizer import new_run_id

    pipeline = load_pipeline(args.pipeline)
    pipeline.validate()
    params = options.run_params(args, pipeline)
    workers = options.workers(args, MAX_WORKERS)
    executor = options.executor(args, EXECUTOR_NAMES) or EXECUTOR_NAMES[0]
    with make_optimizer(args, workers=workers, executor=executor) as optimizer:
        run_id = new_run_id()
        store = optimizer.store
        if store is not None:
            # Recorded before the run starts, so that `pipeopt resume` works even after a kill -9.
            store.set_source(run_id, source_of(args.pipeline))
        return run_session(
            optimizer,
            args,
            lambda: optimizer.run(pipeline, run_id=run_id, params=params),
            title=pipeline.name,
            total=len(pipeline),
        )
