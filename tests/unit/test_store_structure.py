"""The one structure fingerprint: what resume compares to tell a changed pipeline."""

from __future__ import annotations

from pipeopt import Pipeline, PipelineTask
from pipeopt.store import structure_of
from pipeopt.store.structure import Structure, StructureEncoder, differences


def noop() -> None:
    """Do nothing."""


def build(order: list[str], *, extra_edge: bool = False, criticality: str = "medium") -> Pipeline:
    specs = {"a": [], "b": ["a"], "c": ["a", "b"] if extra_edge else ["a"]}
    pipeline = Pipeline("fp")
    for name in order:
        level = criticality if name == "c" else "medium"
        pipeline.add(PipelineTask(name, noop, dependencies=specs[name], criticality=level))
    return pipeline


def test_the_fingerprint_sees_edges_and_criticality_and_is_stable() -> None:
    base = structure_of(build(["a", "b", "c"]).compile())
    assert structure_of(build(["a", "b", "c"]).compile()) == base
    assert structure_of(build(["a", "b", "c"], extra_edge=True).compile())[0] != base[0]
    assert structure_of(build(["a", "b", "c"], criticality="low").compile())[0] != base[0]


def test_a_reordered_graph_has_another_fingerprint_but_no_differences() -> None:
    fingerprint, text = structure_of(build(["a", "b", "c"]).compile())
    reordered = build(["c", "b", "a"]).compile()
    assert structure_of(reordered)[0] != fingerprint
    assert differences(Structure.parse(text), reordered) == []


def test_differences_name_each_change() -> None:
    _, text = structure_of(build(["a", "b", "c"]).compile())
    changed = build(["a", "b", "c"], extra_edge=True, criticality="blocker").compile()
    assert differences(Structure.parse(text), changed) == [
        "task 'c' dependencies changed: [a] -> [a, b]",
        "task 'c' criticality changed: medium -> blocker",
    ]


def test_the_encoder_reuses_an_identical_graph_and_sees_a_changed_one() -> None:
    encoder = StructureEncoder()
    first = encoder.encode(build(["a", "b", "c"]).compile())
    assert encoder.encode(build(["a", "b", "c"]).compile()) == first
    changed = build(["a", "b", "c"], extra_edge=True).compile()
    assert encoder.encode(changed) == structure_of(changed) != first
