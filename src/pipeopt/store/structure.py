"""The structure of a pipeline as the run store keeps it, and its fingerprint.

A structure is the task names in order, each task's own and effective
criticality, and the dependencies. :func:`structure_of` encodes it as
compact JSON and fingerprints the JSON; resume compares fingerprints to
tell whether a pipeline changed since a run, and :func:`differences` lists
what changed.
"""

from __future__ import annotations

import array
import base64
import hashlib
import itertools
import json
import operator
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

from pipeopt.priority import LABELS

if TYPE_CHECKING:
    from pipeopt.graph import CompiledPipeline

DIFF_LIMIT: Final = 50  # differences listed before "and N more"
_DIGITS = bytes.maketrans(bytes(range(10)), b"0123456789")
_CRITICALITY_OF = operator.attrgetter("criticality")


def _packed(values: list[int]) -> str:
    numbers = array.array("i", values)
    if sys.byteorder == "big":
        numbers.byteswap()  # stored little-endian
    return base64.b64encode(numbers.tobytes()).decode("ascii")


def _unpacked(text: str) -> list[int]:
    numbers = array.array("i")
    numbers.frombytes(base64.b64decode(text))
    if sys.byteorder == "big":
        numbers.byteswap()
    return numbers.tolist()


def structure_of(compiled: CompiledPipeline) -> tuple[str, str]:
    """Return ``(fingerprint, JSON)`` of a compiled pipeline's structure.

    The JSON holds the task names in order, each task's own and effective
    criticality as one digit per task (0 blocker … 5 deferred), and the
    dependencies as two base64 arrays of little-endian int32 (how many per
    task, then the dependency indices): plain JSON lists of numbers would
    cost a good part of the store's budget on large pipelines. The
    fingerprint is a SHA-256 prefix of the JSON, so it also changes when
    tasks are only reordered; :meth:`RunStore.structure_diff` then finds no
    difference.
    """
    encoded = _encode(compiled, bytes(map(_CRITICALITY_OF, compiled.tasks)))
    return encoded.fingerprint, encoded.text


class _Encoded(NamedTuple):
    """A structure's inputs and its encoding, to reuse for an identical graph."""

    names: list[str]
    dependencies: list[tuple[int, ...]]
    criticality: bytes
    levels: list[int]
    fingerprint: str
    text: str

    def encodes(self, compiled: CompiledPipeline, criticality: bytes) -> bool:
        """Return whether ``compiled`` has exactly this structure (cheap comparisons)."""
        return (
            self.criticality == criticality
            and self.levels == compiled.levels
            and self.names == compiled.names
            and self.dependencies == compiled.dependencies
        )


def _encode(compiled: CompiledPipeline, criticality: bytes) -> _Encoded:
    deps = compiled.dependencies
    document = {
        "format": 1,
        "tasks": compiled.names,
        "criticality": criticality.translate(_DIGITS).decode("ascii"),
        "levels": bytes(compiled.levels).translate(_DIGITS).decode("ascii"),
        "dependency_counts": _packed(list(map(len, deps))),
        "dependencies": _packed(list(itertools.chain.from_iterable(deps))),
    }
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _Encoded(
        list(compiled.names), list(deps), criticality, list(compiled.levels), fingerprint, text
    )


class StructureEncoder:
    """:func:`structure_of` that reuses the last encoding of each pipeline's graph.

    Comparing a graph with the last one of its pipeline costs a fifth of
    encoding it again; repeated runs of one pipeline then pay only that.
    Not thread-safe: the store calls it under its lock.
    """

    def __init__(self) -> None:
        self._last: dict[str, _Encoded] = {}

    def encode(self, compiled: CompiledPipeline) -> tuple[str, str]:
        """Return ``(fingerprint, JSON)`` of ``compiled``, as :func:`structure_of` does."""
        criticality = bytes(map(_CRITICALITY_OF, compiled.tasks))
        last = self._last.get(compiled.name)
        if last is None or not last.encodes(compiled, criticality):
            last = self._last[compiled.name] = _encode(compiled, criticality)
        return last.fingerprint, last.text


@dataclass(frozen=True, slots=True)
class Structure:
    """A stored structure, decoded: names, criticality digits and dependency indices."""

    names: list[str]
    criticality: str
    levels: str
    dependencies: list[list[int]]

    @classmethod
    def parse(cls, text: str) -> Structure:
        """Decode the JSON written by :func:`structure_of`.

        Raises:
            ValueError, KeyError, TypeError: the text is not such a structure.
        """
        doc = json.loads(text)
        counts = _unpacked(doc["dependency_counts"])
        flat = _unpacked(doc["dependencies"])
        deps: list[list[int]] = []
        at = 0
        for count in counts:
            deps.append(flat[at : at + count])
            at += count
        return cls(list(doc["tasks"]), str(doc["criticality"]), str(doc["levels"]), deps)

    def dependency_names(self, i: int) -> list[str]:
        """Return the sorted names of task ``i``'s dependencies."""
        return sorted(self.names[d] for d in self.dependencies[i])


def differences(old: Structure, compiled: CompiledPipeline) -> list[str]:
    """Return how ``compiled`` differs from ``old``, one line each (see ``structure_diff``)."""
    old_index = {name: i for i, name in enumerate(old.names)}
    new_index = compiled.index
    found = [f"task {name!r} removed" for name in old.names if name not in new_index]
    for task in compiled.tasks:
        j = old_index.get(task.name)
        if j is None:
            found.append(f"task {task.name!r} added")
            continue
        before = old.dependency_names(j)
        after = sorted(task.dependency_names)
        if before != after:
            found.append(
                f"task {task.name!r} dependencies changed: "
                f"[{', '.join(before)}] -> [{', '.join(after)}]"
            )
        was, now = LABELS[int(old.criticality[j])], LABELS[int(task.criticality)]
        if was != now:
            found.append(f"task {task.name!r} criticality changed: {was} -> {now}")
    if len(found) > DIFF_LIMIT:
        more = len(found) - DIFF_LIMIT + 1
        found = [*found[: DIFF_LIMIT - 1], f"and {more} more differences"]
    return found
