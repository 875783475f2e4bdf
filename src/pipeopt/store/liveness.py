"""Whether the process that recorded a run (or holds a run's lock) still runs.

A process is named by its host, pid and start time (field 22 of
``/proc/PID/stat``, in clock ticks since boot): the start time tells a live
process from a new one that was given the same pid. On another host, or
without ``/proc``, a process is assumed alive when it cannot be checked.
"""

from __future__ import annotations

import os
import socket
from typing import Final

HOST: Final = socket.gethostname()


def process_start(pid: int) -> str | None:
    """Return the start time of process ``pid`` from /proc, or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] == b"Z":  # a zombie has ended already
        return None
    return fields[19].decode("ascii")


def process_alive(host: str, pid: int, started: str | None) -> bool:
    """Return whether the process ``(host, pid, started)`` may still be running."""
    if host != HOST:
        return True  # cannot tell from here
    if started is not None and os.path.isdir("/proc"):
        return process_start(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
