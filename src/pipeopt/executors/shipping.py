"""Send task functions to other processes: by reference where they can, by value where they must.

Policy
    A function goes *by reference* (module and name, plain :mod:`pickle`)
    when that name leads a worker to the same function: a module-level
    function of a module the worker can import, or the function of a
    ``@pipeline.task``-decorated name there (its module-level name is bound
    to the :class:`~pipeopt.graph.PipelineTask`, so :class:`TaskFunction`
    names the task and the worker takes its ``func``). Everything else goes
    *by value* with :mod:`cloudpickle`: the function's code, the variables
    it closes over and the module globals it uses. That covers closures,
    lambdas, partials of any of these, functions of an interactive
    ``__main__``, and functions of a file loaded by path, such as the one
    ``pipeopt run`` loads, which no worker can import by name.

    Whether a worker can import a module is decided once per module: it
    must be found on ``sys.path`` by its name (a file loaded by path is
    not), and ``__main__`` counts only for worker processes started from
    this script (they import it; Dask workers do not).

State
    :class:`Shipper` remembers, for one run, how each task function goes
    (``None`` for by reference, else its cloudpickled bytes), so a function
    is pickled by value once per run, not once per attempt.

Errors
    What cannot be pickled at all (a lock, a database connection, an open
    file that a task captures) is reported by :meth:`Shipper.prepare`
    before the run, as a :class:`~pipeopt.errors.NotPicklableError` that
    names the task and the object.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.machinery
import io
import pickle
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import cloudpickle

from pipeopt.errors import NotPicklableError
from pipeopt.executors.remote import PICKLE_PROTOCOL
from pipeopt.graph import PipelineTask

if TYPE_CHECKING:
    from pipeopt.executors.base import TaskCall
    from pipeopt.graph import CompiledPipeline

__all__ = [
    "ByValue",
    "Shipper",
    "TaskFunction",
    "describe_unpicklable",
    "rebuild",
    "task_function",
    "worker_can_import",
]

_SEARCH_DEPTH = 4


class ByValue:
    """A function shipped by value; it unpickles as the function itself.

    ``template`` is a cloudpickled function; ``extras``, when given, are the
    closure values, defaults and attributes of *this* function, which shares
    the template's code and globals. Functions made in a loop share one
    template, so the code goes to each worker once and each task sends only
    what it captured. Where no pickling happens (an in-process Dask
    cluster), calling it builds the function once and calls it.
    """

    __slots__ = ("extras", "func", "template")

    def __init__(self, template: bytes, extras: tuple[Any, ...] | None = None) -> None:
        self.template = template
        self.extras = extras
        self.func: Callable[..., Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (rebuild, (self.template, self.extras))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function."""
        if self.func is None:
            self.func = rebuild(self.template, self.extras)
        return self.func(*args, **kwargs)


_EMPTY = object()  # stands for an empty closure cell
_MAX_TEMPLATES = 256
_templates: dict[bytes, types.FunctionType] = {}


def rebuild(template: bytes, extras: tuple[Any, ...] | None) -> Callable[..., Any]:
    """Return the function a :class:`ByValue` stands for (runs in the worker)."""
    if extras is None:
        loaded: Callable[..., Any] = pickle.loads(template)
        return loaded
    base = _templates.get(template)
    if base is None:
        if len(_templates) >= _MAX_TEMPLATES:
            _templates.clear()
        base = _templates[template] = pickle.loads(template)
    cells, defaults, kwdefaults, attributes = extras
    closure = tuple(types.CellType() if v is _EMPTY else types.CellType(v) for v in cells)
    func = types.FunctionType(
        base.__code__, base.__globals__, base.__name__, defaults, closure or None
    )
    func.__kwdefaults__ = kwdefaults
    func.__qualname__ = base.__qualname__
    func.__module__ = base.__module__
    func.__doc__ = base.__doc__
    if attributes:
        func.__dict__.update(attributes)
    return func


class TaskFunction:
    """The function of a ``@pipeline.task``-decorated module-level name, by reference.

    The decorator binds the name to a :class:`~pipeopt.graph.PipelineTask`,
    so plain pickle cannot find the function under it; the worker imports
    the module and takes the task's ``func``.
    """

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str) -> None:
        self.module = module
        self.qualname = qualname

    def __reduce__(self) -> tuple[Any, ...]:
        return (task_function, (self.module, self.qualname))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function."""
        return task_function(self.module, self.qualname)(*args, **kwargs)


def task_function(module: str, qualname: str) -> Callable[..., Any]:
    """Return the function of the task bound to ``module.qualname`` (runs in the worker)."""
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    func: Callable[..., Any] = found.func
    return func


def _origin_on_path(name: str) -> str | None:
    """Return where a fresh import of ``name`` would load it from; ``""`` if nowhere."""
    parent, _, leaf = name.rpartition(".")
    search: list[str] | None = None
    if parent:
        search = getattr(sys.modules.get(parent), "__path__", None)
        if search is None:
            return ""
    try:
        spec = importlib.machinery.PathFinder.find_spec(leaf if parent else name, search)
    except (ImportError, ValueError):
        return ""
    if spec is None:
        return ""
    return spec.origin


def worker_can_import(name: str, *, main_importable: bool) -> bool:
    """Return whether a worker can import module ``name`` and find what the driver finds there.

    ``__main__`` counts when ``main_importable`` and it is a script or a
    module (not an interactive session). Any other module must be on
    ``sys.path`` under its name, from the same file: a file loaded by path
    (``pipeopt run``, ``spec_from_file_location``) is not.
    """
    module = sys.modules.get(name)
    if name == "__main__":
        return main_importable and (
            getattr(module, "__file__", None) is not None
            or getattr(module, "__spec__", None) is not None
        )
    if module is None:
        return False
    if name in sys.builtin_module_names or name in sys.stdlib_module_names:
        return True
    loaded = getattr(getattr(module, "__spec__", None), "origin", None)
    found = _origin_on_path(name)
    if found == "":
        return False
    return loaded is None or found is None or loaded == found


class _Spy(pickle.Pickler):
    """Pickle into nowhere, noting the modules of the classes and functions pickled by name.

    Made once per :class:`Shipper` (making a pickler costs more than using it).
    """

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        super().__init__(self._buffer, PICKLE_PROTOCOL)
        self.modules: set[str] = set()

    def modules_of(self, obj: Any) -> set[str]:
        """Pickle ``obj`` and return the modules it names; raise if it does not pickle."""
        self.modules.clear()
        self.clear_memo()
        self._buffer.seek(0)
        self._buffer.truncate()
        self.dump(obj)
        return self.modules

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType):
            module = getattr(obj, "__module__", None)
            if isinstance(module, str):
                self.modules.add(module)
        return NotImplemented


class Shipper:
    """Decide, once per run, how each task function travels to the workers.

    Args:
        main_importable: whether the workers import the driver's ``__main__``
            script (worker processes do; Dask workers do not).
    """

    def __init__(self, *, main_importable: bool) -> None:
        self.main_importable = main_importable
        self._plans: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}
        self._templates: dict[tuple[types.CodeType, int], bytes] = {}
        self._importable: dict[str, bool] = {}
        self._spy = _Spy()
        self._lock = threading.Lock()
        self.local_modules: set[str] = set()

    def prepare(self, compiled: CompiledPipeline) -> None:
        """Plan how every task's function travels; forget the plans of earlier runs.

        Raises:
            NotPicklableError: a task uses an object that cannot be pickled;
                the message names the task and the object.
        """
        self._plans.clear()
        self._templates.clear()
        self._importable.clear()
        for task in compiled.tasks:
            self.plan(task.name, task.func)

    def plan(self, task: str, func: Callable[..., Any]) -> Callable[..., Any]:
        """Return what to pickle for ``func``: itself when it goes by reference.

        Raises:
            NotPicklableError: ``func`` uses an object that cannot be pickled.
        """
        known = self._plans.get(id(func))
        if known is not None and known[0] is func:
            return known[1]
        try:
            with self._lock:
                shipped = self._shippable(func)
        except NotPicklableError:
            raise
        except Exception as exc:
            found = describe_unpicklable(func)
            reason = found if found is not None else f"{type(exc).__name__}: {exc}"
            raise NotPicklableError(task, reason) from exc
        self._plans[id(func)] = (func, shipped)
        return shipped

    def ship(self, call: TaskCall) -> TaskCall:
        """Return ``call`` with its function in the form that reaches a worker intact."""
        shipped = self.plan(call.task, call.func)
        if shipped is call.func:
            return call
        return dataclasses.replace(call, func=shipped)

    def refers_to_local_module(self, data: bytes) -> bool:
        """Return whether pickled ``data`` names a module that workers cannot import."""
        return any(name.encode() in data for name in self.local_modules)

    def _shippable(self, func: Callable[..., Any]) -> Callable[..., Any]:
        if type(func) is functools.partial:
            inner = self._shippable(func.func)
            self._check((func.args, func.keywords))
            if inner is func.func:
                return func
            return functools.partial(inner, *func.args, **func.keywords)
        if isinstance(func, types.FunctionType):
            found = self._by_reference(func)
            if found is not None:
                return found
            return self._function_by_value(func)
        if self._check(func):
            return func
        return ByValue(self._cloudpickle(func))

    def _by_reference(self, func: types.FunctionType) -> Callable[..., Any] | None:
        """Return ``func`` or a :class:`TaskFunction` when workers find it by name."""
        module, qualname = func.__module__, func.__qualname__
        if "<" in qualname or not self._can_import(module):
            return None
        found: Any = sys.modules[module]
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is func:
            same: Callable[..., Any] = func
            return same
        if isinstance(found, PipelineTask) and found.func is func:
            return TaskFunction(module, qualname)
        return None

    def _function_by_value(self, func: types.FunctionType) -> ByValue:
        key = (func.__code__, id(func.__globals__))
        template = self._templates.get(key)
        if template is None:
            template = self._templates[key] = self._cloudpickle(func)
        cells = []
        for cell in func.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell
                cells.append(_EMPTY)
        extras = (tuple(cells), func.__defaults__, func.__kwdefaults__, dict(func.__dict__))
        self._check(extras)
        return ByValue(template, extras)

    def _check(self, obj: Any) -> bool:
        """Return whether plain pickle sends ``obj`` intact; raise if nothing can send it."""
        try:
            named = self._spy.modules_of(obj)
        except Exception:
            self._cloudpickle(obj)
            return False
        local = {name for name in named if not self._can_import(name)}
        self._register(local)
        return not local

    def _register(self, local: set[str]) -> None:
        for name in local - self.local_modules - {"__main__"}:
            module = sys.modules.get(name)
            if module is not None:
                cloudpickle.register_pickle_by_value(module)
        self.local_modules |= local

    def _cloudpickle(self, obj: Any) -> bytes:
        data: bytes = cloudpickle.dumps(obj, PICKLE_PROTOCOL)
        return data

    def _can_import(self, name: str) -> bool:
        known = self._importable.get(name)
        if known is None:
            known = self._importable[name] = worker_can_import(
                name, main_importable=self.main_importable
            )
            if not known:
                self._register({name})
        return known


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(how obj holds it, part)`` for the objects that pickling ``obj`` pickles."""
    if isinstance(obj, functools.partial):
        yield "the partial's function", obj.func
        for k, arg in enumerate(obj.args):
            yield f"argument {k} of the partial", arg
        for key, arg in obj.keywords.items():
            yield f"argument {key!r} of the partial", arg
    elif isinstance(obj, types.MethodType):
        yield f"the object of method {obj.__func__.__qualname__!r}", obj.__self__
        yield f"method {obj.__func__.__qualname__!r}", obj.__func__
    elif isinstance(obj, types.FunctionType):
        name = obj.__qualname__
        cells = obj.__closure__ or ()
        for var, cell in zip(obj.__code__.co_freevars, cells, strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            yield f"variable {var!r} captured by {name!r}", value
        seen: set[str] = set()
        for var in _global_names(obj.__code__):
            if var in obj.__globals__ and var not in seen:
                seen.add(var)
                yield f"global {var!r} used by {name!r}", obj.__globals__[var]
        for k, default in enumerate(obj.__defaults__ or ()):
            yield f"default {k} of {name!r}", default
        for key, default in (obj.__kwdefaults__ or {}).items():
            yield f"default of {key!r} in {name!r}", default
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield f"item {key!r}", value
    elif isinstance(obj, list | tuple | set | frozenset):
        for k, value in enumerate(obj):
            yield f"item {k}", value
    elif not isinstance(obj, type | types.ModuleType) and hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            yield f"attribute {key!r}", value


def _picklable(obj: Any) -> bool:
    try:
        cloudpickle.dumps(obj, PICKLE_PROTOCOL)
    except Exception:
        return False
    return True


def describe_unpicklable(obj: Any) -> str | None:
    """Return which object inside ``obj`` cannot be pickled, and why; ``None`` if none is found."""
    path: list[str] = []
    culprit: Any = None
    current = obj
    for _ in range(_SEARCH_DEPTH):
        for how, part in _parts(current):
            if isinstance(part, types.ModuleType) or _picklable(part):
                continue
            path.append(how)
            culprit = current = part
            break
        else:
            break
    if not path:
        return None
    try:
        cloudpickle.dumps(culprit, PICKLE_PROTOCOL)
        error = ""
    except Exception as exc:
        error = f" ({type(exc).__name__}: {exc})"
    kind = type(culprit)
    where = " of ".join(reversed(path))
    return (
        f"{where} is a {kind.__module__}.{kind.__qualname__} ({_short(culprit)}), "
        f"which cannot be pickled{error}"
    )


def _short(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:
        return "object"
    return text if len(text) <= 80 else text[:77] + "..."
