"""Property test: every numeric and string field of the run-config schema (sections,
the image_folder stream and every strategy's Params) driven through edge values.

Whatever the value, the CLI either accepts the file or prints one ``error:`` line with
exit code 2, writes nothing and shows no traceback; values no field may hold (NaN,
+-inf, integers past 64 bits, over-long or empty run names) are always refused.
"""
from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from cl_proxyfda.cli import main
from cl_proxyfda.config import RunConfig
from cl_proxyfda.registry import STRATEGIES, STREAMS, load_builtin_components
from conftest import tiny_config

Field = tuple[tuple[Any, ...], str]  # (key path, "int" | "float" | "str")


def _kinds(annotation: Any) -> set[str]:
    """The scalar kinds an annotation accepts (Optional / unions / Literal unpacked)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return set()
    return {"int": {"int"}, "float": {"float"}, "str": {"str"}}.get(getattr(annotation, "__name__", ""), set())


def _models(annotation: Any) -> list[type[BaseModel]]:
    args = typing.get_args(annotation) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _fields(model: type[BaseModel], prefix: tuple[Any, ...]) -> list[Field]:
    out: list[Field] = []
    for name, info in model.model_fields.items():
        if name in ("stream", "strategies"):
            continue
        path = prefix + (name,)
        out += [(path, kind) for kind in sorted(_kinds(info.annotation))]
        for sub in _models(info.annotation):
            out += _fields(sub, path)
    return out


def schema_fields() -> list[Field]:
    load_builtin_components()
    fields = _fields(RunConfig, ())
    fields += _fields(STREAMS.get("image_folder").params, ("stream",))
    for name in STRATEGIES.names():
        fields += [(("strategies", 0, "@" + name) + path, kind) for path, kind in _fields(STRATEGIES.get(name).params, ())]
    return fields


FIELDS = schema_fields()
HUGE = 10**30
NUMBERS = [math.nan, math.inf, -math.inf, -1, 0, 1, -(10**9), 2**31, 2**32, 2**63, HUGE, -HUGE, 1e308, -1e-308, 0.5, 1e-12]
STRINGS = ["", " ", "x" * 300, "y" * 5000, "\x00", "a\nb", "\udcff\udc80", "\u202eevil\u202c", "caf\xe9 \U0001f600", "../..", "{}", "%s%n", "~"]


def _value_strategy(kind: str):
    if kind in ("int", "float"):
        return st.one_of(st.sampled_from(NUMBERS), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True))
    return st.one_of(st.sampled_from(STRINGS), st.text(max_size=40))


@st.composite
def field_and_value(draw):
    path, kind = draw(st.sampled_from(FIELDS))
    return path, kind, draw(_value_strategy(kind))


def must_refuse(path: tuple[Any, ...], kind: str, value: Any) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return kind in ("int", "float")
    if isinstance(value, int) and abs(value) >= 2**63:
        return True
    if path == ("run", "name") and isinstance(value, str):
        return not value or len(value.encode("utf-8", "surrogatepass")) > 255 or "/" in value or value in (".", "..") or "\x00" in value
    return False


def _config(data_root: Path, out: Path, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    cfg = tiny_config(data_root, out)
    node: Any = cfg
    parts = list(path)
    if parts[0] == "strategies":
        name = parts[2][1:]
        cfg["strategies"] = [{"name": name}]
        node, parts = cfg["strategies"][0], parts[3:]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return cfg
    node[parts[-1]] = value
    return cfg


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=field_and_value())
def test_edge_values_give_one_line_exit_2_and_write_nothing(case, data_root, tmp_path_factory, capsys):
    path, kind, value = case
    base = tmp_path_factory.mktemp("prop")
    out = base / "runs"
    cfg = _config(data_root, out, path, value)
    cfg_path = base / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    refuse = must_refuse(path, kind, value)
    # a value that must be refused goes through `run` (it fails in parsing: nothing trains)
    code = main(["run" if refuse else "validate", str(cfg_path)])
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert code in (0, 2), (path, value, err)
    if refuse:
        assert code == 2, (path, value, captured.out)
    if code == 2:
        # `run` stops at the first problem: one line; `validate` lists every problem
        # (a field set alone may leave a sibling missing), one line each.
        assert lines and all(line.startswith("error: ") for line in lines), (path, value, err)
        if refuse:
            assert len(lines) == 1, (path, value, err)
    assert not out.exists(), "nothing may be written"
    assert sorted(p.name for p in base.iterdir()) == ["run.yaml"]


def test_the_fields_cover_every_section():
    sections = {p[0] for p, _ in FIELDS}
    assert {"run", "model", "train", "eval", "logging", "checkpoint", "stream", "strategies"} <= sections
    strategies = {p[2] for p, _ in FIELDS if p[0] == "strategies"}
    assert {"@proxy_fda", "@gift", "@zscl", "@infusing", "@awc", "@lwf"} <= strategies
    assert len(FIELDS) > 80


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_refuses_non_finite_values(value, data_root, tmp_path, capsys):
    """Not sampled: every float field of the schema, each with NaN and +-inf."""
    for path, kind in FIELDS:
        if kind != "float":
            continue
        cfg_path = tmp_path / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(_config(data_root, tmp_path / "runs", path, value)))
        assert main(["run", str(cfg_path)]) == 2, path
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "finite" in err, (path, err)
    assert not (tmp_path / "runs").exists()
