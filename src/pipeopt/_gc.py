"""Hold off the cyclic garbage collector while large graphs are built, compiled and run.

Building, compiling or running a pipeline allocates a few long-lived objects
per task. With CPython's default thresholds the collector then walks the
whole heap again and again, which costs as much as the work itself and grows
with the heap. :func:`holding_gc` (for at least :data:`GC_TUNING_MIN_TASKS`
tasks) freezes the objects that exist on entry and raises the young
generation's threshold; the outermost exit restores both. Reference counting
still frees everything that is not part of a cycle as usual. Process-wide
while it lasts; nesting and threads are fine.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Final

#: Graphs below this many tasks leave the collector alone.
GC_TUNING_MIN_TASKS: Final = 1_000

_YOUNG_THRESHOLD = 50_000


class GcTuning:
    """The process-wide hold on the collector, counted so that nested holds nest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: tuple[int, int, int] | None = None

    def __enter__(self) -> None:
        with self._lock:
            self._depth += 1
            if self._depth == 1 and gc.isenabled():
                self._saved = gc.get_threshold()
                gc.freeze()
                gc.set_threshold(max(self._saved[0], _YOUNG_THRESHOLD), *self._saved[1:])

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._saved is not None:
                gc.set_threshold(*self._saved)
                gc.unfreeze()
                self._saved = None


gc_tuning = GcTuning()


def holding_gc(tasks: int, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Return :data:`gc_tuning` for graphs of ``tasks`` or more, a no-op context otherwise."""
    if enabled and tasks >= GC_TUNING_MIN_TASKS:
        return gc_tuning
    return contextlib.nullcontext()
