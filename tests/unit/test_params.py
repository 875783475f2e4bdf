"""Run parameters: declared with defaults, set per run, converted from the command line."""

from __future__ import annotations

import datetime as dt
import pickle
from collections.abc import Mapping
from typing import Any

import pytest

from pipeopt import ParameterError, Pipeline, PipelineOptimizer
from pipeopt.params import RunParams, parse_params, resolve_params


def _daily() -> Pipeline:
    p = Pipeline("etl", params={"date": "2013-01-01", "limit": 100, "ratio": 0.5})

    @p.task
    def extract(params: Mapping[str, Any]) -> tuple[str, int, float]:
        return params["date"], params["limit"], params["ratio"]

    return p


def test_bodies_receive_defaults_and_overrides_read_only() -> None:
    p = _daily()
    optimizer = PipelineOptimizer(max_workers=1)
    assert optimizer.run(p).results["extract"] == ("2013-01-01", 100, 0.5)
    result = optimizer.run(p, params={"date": "2013-02-01", "ratio": 2})
    assert result.results["extract"] == ("2013-02-01", 100, 2.0)
    assert result.params == {"date": "2013-02-01", "limit": 100, "ratio": 2.0}
    assert result.to_dict()["params"]["date"] == "2013-02-01"

    seen: list[Any] = []
    q = Pipeline("ro", params={"a": 1})

    @q.task
    def write(params: Any) -> None:
        seen.append(params)
        params["a"] = 2

    result = optimizer.run(q)
    assert isinstance(result.tasks["write"].error, TypeError)
    assert pickle.loads(pickle.dumps(seen[0])) == {"a": 1}


def test_unknown_and_ill_typed_parameters_are_refused_before_anything_runs() -> None:
    p = _daily()
    optimizer = PipelineOptimizer(max_workers=1)
    with pytest.raises(ParameterError, match="unknown parameter 'dat'; did you mean 'date'"):
        optimizer.run(p, params={"dat": "x"})
    with pytest.raises(ParameterError, match="'limit' must be int like its default 100"):
        optimizer.run(p, params={"limit": "5"})
    with pytest.raises(ParameterError, match="'limit' must be int"):
        optimizer.run(p, params={"limit": True})


def test_command_line_strings_are_converted_to_the_defaults_types() -> None:
    declared = {
        "date": dt.date(2013, 1, 1),
        "limit": 100,
        "ratio": 0.5,
        "dry_run": False,
        "name": "x",
        "tags": ["a"],
    }
    values = parse_params(
        declared,
        ["date=2013-02-01", "limit=5", "ratio=1e-3", "dry_run=yes", "name=a=b", 'tags=["b","c"]'],
    )
    assert values == {
        "date": dt.date(2013, 2, 1),
        "limit": 5,
        "ratio": 0.001,
        "dry_run": True,
        "name": "a=b",
        "tags": ["b", "c"],
    }
    assert resolve_params(declared, values)["limit"] == 5
    with pytest.raises(ParameterError, match="'limit' must be int like its default 100; 'five'"):
        parse_params(declared, ["limit=five"])
    with pytest.raises(ParameterError, match="did you mean 'limit'"):
        parse_params(declared, ["limt=5"])
    with pytest.raises(ParameterError, match="KEY=VALUE"):
        parse_params(declared, ["limit"])
    with pytest.raises(ParameterError, match="'date' must be date"):
        parse_params(declared, ["date=yesterday"])


def test_run_params_mapping_names_the_nearest_key() -> None:
    params = RunParams({"limit": 1})
    with pytest.raises(ParameterError, match="did you mean 'limit'"):
        params["limits"]
    assert dict(params) == {"limit": 1}
    assert params.get("other", 2) == 2
    assert "limit" in params
    assert "other" not in params
