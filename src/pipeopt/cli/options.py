"""Options of the commands that run a pipeline: optimizer settings, parameters, log level.

Each optimizer setting is an option and a ``PIPEOPT_*`` environment variable;
the option wins, and without either the optimizer's default applies. A value
that does not parse is a one-line error naming the option or the variable
(exit 2). ``--param KEY=VALUE`` sets a run parameter declared by the
pipeline, converted to the type of its default.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeopt.errors import UsageError
from pipeopt.params import parse_flag

if TYPE_CHECKING:
    from pipeopt.graph import Pipeline

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_OFF = ("off", "none")


def _seconds_or_off(text: str) -> float | None:
    if text.strip().lower() in _OFF:
        return None
    value = _float(text)
    if not value > 0:
        raise ValueError(f"must be seconds > 0 or 'off', got {text!r}")
    return value


def _grace(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise ValueError(f"must be seconds >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise ValueError(f"must be an integer >= 1, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"must be a number, got {text!r}") from None


@dataclass(frozen=True)
class Setting:
    """One optimizer setting: its option, environment variable and keyword."""

    option: str
    env: str
    keyword: str
    parse: Callable[[str], Any]
    help: str

    @property
    def dest(self) -> str:
        """Return the argparse destination of the option."""
        return self.option.lstrip("-").replace("-", "_")


SETTINGS = (
    Setting(
        "--batch-slo",
        "PIPEOPT_BATCH_SLO",
        "batch_latency_slo",
        _seconds_or_off,
        "latency SLO, in seconds, of each task's adaptive batcher; 'off' for fixed "
        "batches (default 0.1)",
    ),
    Setting(
        "--batch-size",
        "PIPEOPT_BATCH_SIZE",
        "batch_size",
        _positive,
        "first batch size, or the fixed size with --batch-slo off (default 1000)",
    ),
    Setting(
        "--aging-interval",
        "PIPEOPT_AGING_INTERVAL",
        "aging_interval",
        _seconds_or_off,
        "seconds of waiting that promote a ready task one criticality level; "
        "'off' for strict priority (default 5)",
    ),
    Setting(
        "--interrupt-grace",
        "PIPEOPT_INTERRUPT_GRACE",
        "interrupt_grace",
        _grace,
        "seconds Ctrl-C waits for running bodies (default 1)",
    ),
    Setting("--seed", "PIPEOPT_SEED", "seed", _integer, "seed of the retry jitter"),
    Setting(
        "--learn-durations",
        "PIPEOPT_LEARN_DURATIONS",
        "learn_durations",
        parse_flag,
        "rank tasks without expected_duration by their durations learned in the run store, "
        "and teach it this run's: yes or no (default yes; needs a state dir)",
    ),
)
WORKERS_ENV = "PIPEOPT_WORKERS"
EXECUTOR_ENV = "PIPEOPT_EXECUTOR"
FAIL_FAST_ENV = "PIPEOPT_FAIL_FAST"
LOG_LEVEL_ENV = "PIPEOPT_LOG_LEVEL"


def add_setting_options(parser: argparse.ArgumentParser) -> None:
    """Add an option per optimizer setting (see :data:`SETTINGS`)."""
    group = parser.add_argument_group("optimizer settings (also from PIPEOPT_* variables)")
    for setting in SETTINGS:
        group.add_argument(
            setting.option,
            dest=setting.dest,
            default=None,
            metavar="VALUE",
            help=f"{setting.help}; ${setting.env}",
        )


def add_param_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--param KEY=VALUE`` (repeatable)."""
    parser.add_argument(
        "--param",
        "-p",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a run parameter the pipeline declares (converted to its default's type)",
    )


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-level`` (default INFO, or ``$PIPEOPT_LOG_LEVEL``)."""
    parser.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        metavar="LEVEL",
        help=f"show log records of pipeopt and the tasks from this level on stderr: "
        f"{', '.join(LOG_LEVELS)} (default INFO; ${LOG_LEVEL_ENV})",
    )


def _env_or(args: argparse.Namespace, dest: str, option: str, env: str) -> tuple[str, str] | None:
    """Return ``(text, where)`` of a setting from its option or variable, or ``None``."""
    value = getattr(args, dest, None)
    if value is not None:
        return str(value), option
    text = os.environ.get(env)
    if text is None or not text.strip():
        return None
    return text, env


def optimizer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Return the optimizer keywords the options and ``PIPEOPT_*`` variables set.

    Raises:
        UsageError: a value does not parse (the message names where it came from).
    """
    settings: dict[str, Any] = {}
    for setting in SETTINGS:
        found = _env_or(args, setting.dest, setting.option, setting.env)
        if found is None:
            continue
        text, where = found
        try:
            settings[setting.keyword] = setting.parse(text)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return settings


def workers(args: argparse.Namespace, maximum: int) -> int | None:
    """Return ``--workers`` or ``$PIPEOPT_WORKERS`` (``None``: the default).

    Raises:
        UsageError: ``$PIPEOPT_WORKERS`` is not an integer in range.
    """
    if args.workers is not None:
        return int(args.workers)
    text = os.environ.get(WORKERS_ENV, "").strip()
    if not text:
        return None
    try:
        value = _positive(text)
    except ValueError as exc:
        raise UsageError(f"{WORKERS_ENV}: {exc}") from None
    if value > maximum:
        raise UsageError(f"{WORKERS_ENV}: must be an integer from 1 to {maximum}, got {text!r}")
    return value


def executor(args: argparse.Namespace, choices: tuple[str, ...]) -> str | None:
    """Return ``--executor`` or ``$PIPEOPT_EXECUTOR`` (``None``: not set).

    Raises:
        UsageError: ``$PIPEOPT_EXECUTOR`` names no executor.
    """
    if args.executor is not None:
        return str(args.executor)
    text = os.environ.get(EXECUTOR_ENV, "").strip().lower()
    if not text:
        return None
    if text not in choices:
        raise UsageError(f"{EXECUTOR_ENV}: must be one of {', '.join(choices)}, got {text!r}")
    return text


def fail_fast(args: argparse.Namespace) -> bool:
    """Return ``--fail-fast`` or ``$PIPEOPT_FAIL_FAST``.

    Raises:
        UsageError: ``$PIPEOPT_FAIL_FAST`` is not a yes/no value.
    """
    if args.fail_fast:
        return True
    text = os.environ.get(FAIL_FAST_ENV)
    if text is None:
        return False
    try:
        return parse_flag(text)
    except ValueError as exc:
        raise UsageError(f"{FAIL_FAST_ENV}: must be a yes/no value: {exc}") from None


def log_level(args: argparse.Namespace) -> int:
    """Return the logging level of ``--log-level`` or ``$PIPEOPT_LOG_LEVEL`` (INFO).

    Raises:
        UsageError: not a level name.
    """
    found = _env_or(args, "log_level", "--log-level", LOG_LEVEL_ENV)
    if found is None:
        return logging.INFO
    text, where = found
    name = text.strip().upper()
    if name not in LOG_LEVELS:
        raise UsageError(f"{where}: must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    level: int = logging.getLevelName(name)
    return level


def run_params(args: argparse.Namespace, pipeline: Pipeline) -> dict[str, Any]:
    """Return the ``--param`` values, converted to the types of the pipeline's defaults.

    Raises:
        ParameterError: an undeclared name (with the nearest one) or a bad value.
    """
    from pipeopt.params import parse_params

    return parse_params(pipeline.params, args.params or ())
