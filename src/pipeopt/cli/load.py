"""Load the pipeline named by ``FILE[:PIPELINE]`` on the command line."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

from pipeopt.errors import PipelineError, PipelineLoadError
from pipeopt.graph import Pipeline


def split_ref(ref: str) -> tuple[Path, str | None]:
    """Split ``FILE[:PIPELINE]`` into the file and the name (``None`` when not given)."""
    path, sep, name = ref.rpartition(":")
    if sep and path and name and "/" not in name and not name.endswith(".py"):
        return Path(path), name
    return Path(ref), None


def source_of(ref: str) -> str:
    """Return ``ref`` with its file made absolute, so that it loads from any folder."""
    path, name = split_ref(ref)
    return str(path.resolve()) + (f":{name}" if name else "")


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PipelineLoadError(f"no such pipeline file: {path}")
    module_name = f"_pipeopt_user_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PipelineLoadError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    parent = str(path.resolve().parent)
    if parent not in sys.path:
        # Pipelines commonly import helper modules that sit beside them.
        sys.path.insert(0, parent)
    try:
        spec.loader.exec_module(module)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _call_factory(path: Path, name: str, factory: object) -> object:
    """Call a function that builds the pipeline; it must take no arguments."""
    assert callable(factory)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        required = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if required:
            raise PipelineLoadError(
                f"{path}:{name} needs arguments ({', '.join(required)}); name a Pipeline "
                "or a function that builds one without arguments"
            )
    try:
        return factory()
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineLoadError(
            f"{path}:{name}() failed while building the pipeline: {type(exc).__name__}: {exc}"
        ) from exc


def load_pipeline(ref: str) -> Pipeline:
    """Load the pipeline named by ``FILE[:PIPELINE]``.

    ``PIPELINE`` names a module-level :class:`~pipeopt.Pipeline` or a function
    that takes no arguments and returns one; without it the file must define
    exactly one pipeline.

    Raises:
        PipelineLoadError: the file does not load, the function fails, or
            the reference names no single pipeline.
        PipelineError: building the pipeline found it invalid.
    """
    path, name = split_ref(ref)
    module = _import_file(path)
    if name is not None:
        if not hasattr(module, name):
            found = sorted(k for k, v in vars(module).items() if isinstance(v, Pipeline))
            raise PipelineLoadError(
                f"{path} has no {name!r}; pipelines there: {', '.join(found) or 'none'}"
            )
        obj = getattr(module, name)
        if callable(obj) and not isinstance(obj, Pipeline):
            obj = _call_factory(path, name, obj)
        if not isinstance(obj, Pipeline):
            raise PipelineLoadError(f"{path}:{name} is a {type(obj).__name__}, not a Pipeline")
        return obj
    pipelines = {k: v for k, v in vars(module).items() if isinstance(v, Pipeline)}
    if len(pipelines) == 1:
        return next(iter(pipelines.values()))
    if not pipelines:
        raise PipelineLoadError(f"{path} defines no Pipeline at module level")
    raise PipelineLoadError(
        f"{path} defines several pipelines ({', '.join(sorted(pipelines))}); "
        f"choose one with {path}:NAME"
    )
