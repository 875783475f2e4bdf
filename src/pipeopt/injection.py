"""How to call a task's function: which parameters receive what.

A parameter named ``context`` receives the task's context, one named like a
dependency that dependency's result, one named ``params`` the run's
parameters, ``**kwargs`` the results of the dependencies not named
otherwise; any other parameter must have a default. A mapped task receives
its item under its map source's name. The analysis runs once per function
and set of named dependencies, not once per task.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipeopt.errors import TaskSignatureError

if TYPE_CHECKING:
    from pipeopt.graph import PipelineTask

__all__ = ["BodyKind", "Injection", "injections_of"]

BodyKind = Literal["function", "coroutine", "generator", "async_generator"]


@dataclass(frozen=True, slots=True)
class Injection:
    """How to call one task's function: which parameters get what."""

    wants_context: bool
    by_name: tuple[tuple[str, str], ...]  # (parameter, dependency)
    rest_as_kwargs: tuple[str, ...]  # dependencies passed through **kwargs
    kind: BodyKind
    wants_params: bool = False


# (name, kind, has default) per parameter; None for callables without a signature.
_Params = tuple[tuple[str, inspect._ParameterKind, bool], ...] | None


def _parameters(func: Callable[..., Any]) -> _Params:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    return tuple((p.name, p.kind, p.default is not p.empty) for p in signature.parameters.values())


class _Signature:
    """What one function's signature asks for, and its injections by dependency names.

    A task's :class:`Injection` depends only on which of its dependencies
    the function names (all of them, with ``**kwargs``) and on its map
    source: tasks that share the function and both of those share one record.
    """

    __slots__ = ("kind", "known", "names", "params", "var_kw")

    def __init__(self, func: Callable[..., Any]) -> None:
        self.params = _parameters(func)
        self.kind = _kind(func)
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        # The parameters a dependency can fill by name (never *args or **kwargs).
        self.names = frozenset(p[0] for p in self.params or () if p[1] not in variadic)
        self.var_kw = any(p[1] is inspect.Parameter.VAR_KEYWORD for p in self.params or ())
        self.known: dict[object, Injection] = {}

    def injection(self, task: PipelineTask) -> Injection:
        """Return how to call ``task``'s function (computed once per distinct use).

        Raises:
            TaskSignatureError: a parameter matches nothing the task can receive.
        """
        deps = task._deps
        named: object = deps if self.var_kw else self.names.intersection(deps) if deps else ()
        key = (named, task.map_over)
        found = self.known.get(key)
        if found is None:
            found = self.known[key] = _injection_of(task, self.params, self.kind)
        return found


def injections_of(tasks: list[PipelineTask]) -> list[Injection]:
    """Return how to call each task's function, looking each function up once in a row."""
    cache: dict[object, _Signature] = {}
    injections: list[Injection] = []
    append = injections.append
    last: object = None
    signature: _Signature | None = None
    constant: Injection | None = None  # for a function that names no parameter at all
    for task in tasks:
        func = task.func
        if func is not last or signature is None:
            signature, last = _signature(func, cache), func
            constant = None
        if constant is not None and task.map_over is None:
            append(constant)
            continue
        injection = signature.injection(task)
        if (
            task.map_over is None
            and not signature.names
            and not signature.var_kw
            and signature.params is not None
        ):
            constant = injection
        append(injection)
    return injections


def _signature(func: Callable[..., Any], cache: dict[object, _Signature]) -> _Signature:
    key: object = func
    if type(func) is functools.partial:
        # Every partial is a new object; its signature follows from what it wraps.
        key = (func.func, len(func.args), tuple(func.keywords))
    try:
        found = cache.get(key)
    except TypeError:  # an unhashable callable
        return _Signature(func)
    if found is None:
        found = cache[key] = _Signature(func)
    return found


def _injection_of(task: PipelineTask, params: _Params, kind: BodyKind) -> Injection:
    if params is None:
        # Builtins without a signature get no injected arguments.
        return Injection(False, (), (), kind)
    deps = task.dependency_names
    wants_context = False
    wants_params = False
    by_name: list[tuple[str, str]] = []
    var_kw = False
    for name, param_kind, has_default in params:
        if param_kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if param_kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
            continue
        if param_kind is inspect.Parameter.POSITIONAL_ONLY and not has_default:
            raise TaskSignatureError(task.name, name, deps)
        if name == "context":
            wants_context = True
        elif name in deps:
            by_name.append((name, name))
        elif name == "params":
            wants_params = True
        elif not has_default:
            raise TaskSignatureError(task.name, name, deps)
    named = {dep for _, dep in by_name}
    rest = tuple(d for d in deps if d not in named) if var_kw else ()
    source = task.map_source
    if source is not None and source not in named and source not in rest:
        raise TaskSignatureError(
            task.name,
            source,
            deps,
            hint=f"a task mapped over {source!r} receives each item as parameter {source!r}",
        )
    return Injection(wants_context, tuple(by_name), rest, kind, wants_params)


def _kind(func: Callable[..., Any]) -> BodyKind:
    target = inspect.unwrap(func)
    if inspect.isasyncgenfunction(target):
        return "async_generator"
    if inspect.iscoroutinefunction(target):
        return "coroutine"
    if inspect.isgeneratorfunction(target):
        return "generator"
    return "function"
