"""Stage configs: frozen dataclasses loaded from YAML plus dotted overrides.

Every stage has one keyword-only frozen dataclass holding all its defaults.
This module turns a YAML file and ``key.sub=value`` overrides into such a
dataclass, refusing unknown keys and wrong types (as torchtune and nanoGPT
do), and lets ``__post_init__`` report every bad value at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or override names an unknown key or gives a wrong type."""


# ----------------------------------------------------------------------------
# Validation of values (used by every config's __post_init__)
# ----------------------------------------------------------------------------

Check = tuple[str, Callable[[Any], bool], str]


def check_fields(config: object, checks: Sequence[Check]) -> None:
    """Raise one ValueError listing every field that fails its check.

    ``checks`` is a table of ``(field name, predicate, what was expected)``,
    in the manner of scikit-learn's parameter constraints.
    """
    errors = []
    if dataclasses.is_dataclass(config):
        # A config built in Python is type-checked as YAML is: reciprocal="false" is truthy, dim=8.5 fails deep
        # inside torch, gse={"l1": False} has no attributes.
        hints = _field_hints(type(config))
        errors += [f"{type(config).__name__}.{f.name}={_shown(getattr(config, f.name))}: expected "
                   f"{_type_name(hints[f.name])}" for f in dataclasses.fields(config)
                   if f.name in hints and not _matches(getattr(config, f.name), hints[f.name])]
        # NaN and ±inf pass every comparison-free check and reach training (NaN weights)
        errors += [f"{type(config).__name__}.{f.name}={getattr(config, f.name)!r}: expected a finite number"
                   for f in dataclasses.fields(config) if isinstance(getattr(config, f.name), float)
                   and not math.isfinite(getattr(config, f.name))]
    for name, predicate, expected in checks:
        value = getattr(config, name)
        try:
            ok = bool(predicate(value))
        except Exception:  # a predicate that cannot even run means a wrong value
            ok = False
        if not ok:
            errors.append(f"{type(config).__name__}.{name}={value!r}: expected {expected}")
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _shown(value: Any) -> str:
    """A value as an error message shows it: a config by its class (its repr runs for lines)."""
    return f"{type(value).__name__}(...)" if dataclasses.is_dataclass(value) else repr(value)


def _matches(value: Any, tp: Any) -> bool:
    """``value`` is of annotation ``tp`` as given (a nested config must be one, not a mapping; numpy
    integers and floats count as numbers)."""
    import numbers

    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    if origin in (tuple, list):
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value) if args else True
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:  # paths (out, data, backbone) given as pathlib.Path, as they were accepted before the check
        return isinstance(value, (str, os.PathLike))
    try:
        _coerce(value, tp, "")
    except ConfigError:
        return False
    return True


def in_range(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Callable[[Any], bool]:
    """Predicate for ``check_fields``: ``low <= x <= high`` (or ``low < x``)."""

    def predicate(x: Any) -> bool:
        if low is not None and (x <= low if low_open else x < low):
            return False
        return high is None or x <= high

    return predicate


# ----------------------------------------------------------------------------
# What a field changes: marked once, read by every cache and resume check
# ----------------------------------------------------------------------------

EFFECT = "kgtok.effect"
MACHINE = "machine"  # how to run, never what comes out (threads, scoring batch sizes): ignored by caches and resumes
RESUMABLE = "resumable"  # changes the result, but a killed run's saved state may go on under the new value


def machine(default: Any) -> Any:
    """A config field that never changes a stage's result (threads, batch sizes for scoring)."""
    return dataclasses.field(default=default, metadata={EFFECT: MACHINE})


def resumable(default: Any) -> Any:
    """A config field whose change re-runs the stage but lets it resume from its saved state (e.g. max_steps)."""
    return dataclasses.field(default=default, metadata={EFFECT: RESUMABLE})


def fields_with_effect(cls: type, effect: str, prefix: str = "") -> set[str]:
    """Dotted names of the fields of ``cls`` (and its nested sections) marked with ``effect``."""
    names = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get(EFFECT) == effect:
            names.add(prefix + f.name)
        nested = hints.get(f.name)
        if dataclasses.is_dataclass(nested):
            names |= fields_with_effect(nested, effect, f"{prefix}{f.name}.")
    return names


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def result_config(data: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """A config's plain dict (``config_to_dict``) flattened to dotted keys, without its machine fields.

    What every cache record and resume check compares: two configs that
    differ only in machine fields compute the same thing.
    """
    skip = fields_with_effect(cls, MACHINE) if dataclasses.is_dataclass(cls) else set()
    return {k: v for k, v in _flatten(data).items() if k not in skip}


def saved_result_config(saved: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """``result_config`` of a config saved by an earlier kgtok: a field added since counts as its default.

    A new field's default must keep what the code computed before (else the stage says so in its
    fingerprint, as stage 1's density rule does), so an artifact made before the field existed is current
    for a config that leaves it at its default, and not for one that sets it.
    """
    old = result_config(saved, cls)
    try:
        defaults = result_config(config_to_dict(cls()), cls)
    except TypeError:  # a config without a default for every field: nothing to fill in
        return old
    return {**{k: v for k, v in defaults.items() if not any(k.startswith(o + ".") for o in old)}, **old}


def config_changes(saved: Mapping[str, Any], current: object) -> tuple[list[str], list[str]]:
    """``(resumable, other)`` dotted fields that differ between a saved config dict and ``current``.

    Machine fields are never reported.  A resume is allowed when ``other``
    is empty; the new values of ``resumable`` fields win.
    """
    cls = type(current)
    old, new = saved_result_config(saved, cls), result_config(config_to_dict(current), cls)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    allowed = fields_with_effect(cls, RESUMABLE)
    return [k for k in changed if k in allowed], [k for k in changed if k not in allowed]


# ----------------------------------------------------------------------------
# Conversion between plain data and dataclasses
# ----------------------------------------------------------------------------


def config_to_dict(config: object) -> dict[str, Any]:
    """Plain JSON/YAML-ready dict of a config (tuples become lists, paths strings)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return plain(config)


def _type_name(tp: Any) -> str:
    """``str | None`` as "str or null", a Literal as its values ("Optional" alone named no choice)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(value) for value in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; allow only lossless conversions."""
    # Over 60 lines on purpose: one branch per kind of annotation, the whole type check in one place.
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # pragma: no cover


def _build(cls: type[C], data: Mapping[str, Any], where: str, saved: bool = False) -> C:
    hints = _field_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML reads a bare on: or yes: as a bool key
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; known keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        factory = fields[name].default_factory
        here = f"{where}.{name}" if where else name
        default = factory() if isinstance(value, Mapping) and factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and saved:
            # A key missing from a saved config was added after it: its class default is what ran then.
            kwargs[name] = _build(type(default), value, here, saved=True)
            continue
        if dataclasses.is_dataclass(default):
            # A partial nested section overrides the field's own default (e.g. RunConfig's
            # embed preset), not the nested class's bare defaults.
            value = _merge(config_to_dict(default), value)
        kwargs[name] = _coerce(value, hints[name], here)
    return cls(**kwargs)


def config_from_dict(cls: type[C], data: Mapping[str, Any] | None) -> C:
    """Build ``cls`` from a mapping, refusing unknown keys and wrong types."""
    return _build(cls, data or {}, "")


def saved_config(cls: type[C], data: Mapping[str, Any]) -> C:
    """``cls`` as a saved config (``run_config.json``) describes it.

    Unlike :func:`config_from_dict`, a nested key missing from it takes the nested class's default, not the
    enclosing field's (``RunConfig.instruct``'s ``template: compact``): a saved config holds every key there
    was when it was written, so a missing one was added later, and its class default is what ran then.
    """
    return _build(cls, data, "", saved=True)


class _YAMLLoader(yaml.SafeLoader):
    """YAML's safe loader reading ``1e-3`` as a number, as YAML 1.2 does (PyYAML's 1.1 wants ``1.0e-3``)."""


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with ``1e-3`` a float (config files and overrides)."""
    return yaml.load(text, Loader=_YAMLLoader)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. levels=4 or gse.lambda1=0.8")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:  # e.g. seed=[1 : a bracket not closed
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"{key.strip()}='\"...\"', or close its brackets") from e
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    section: str | None = None,
    values: Mapping[str, Any] | None = None,
) -> C:
    """Load a stage config from an optional YAML file plus dotted overrides.

    ``section`` picks one top-level key of the YAML (a whole-run file holds one
    section per stage).  ``values``: top-level values taken as they are, not
    parsed as YAML (paths from ``--data``/``--out``: ``exp #2`` is no comment,
    ``2024-01-05`` no date).  Later sources win: defaults < YAML < overrides < values.
    """
    data: dict[str, Any] = {}
    overrides = list(overrides)
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = load_yaml(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(
                f"config file {path} does not exist (shipped presets: {', '.join(list_presets())})"
            ) from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            data = path.read_bytes()
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            raise ConfigError(
                f"config file {path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not valid UTF-8; "
                "save the file as UTF-8"
            ) from None
        if loaded is None:
            loaded = {}
        if section is not None:
            loaded = loaded.get(section, {}) if isinstance(loaded, Mapping) else loaded
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data = dict(loaded)
    data = {**_merge(data, parse_overrides(overrides)), **(values or {})}
    try:
        return config_from_dict(cls, data)
    except ConfigError as e:
        key = str(e).split(":", 1)[0]
        if key in {item.partition("=")[0].strip() for item in overrides}:  # the override, not the file, is wrong
            raise ConfigError(f"override {e}") from None
        origin = f"config file {path}" if path is not None else "config"
        raise ConfigError(f"{origin}: {e}") from None


PRESETS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path, or the name of a config shipped in ``kgtok/configs`` (e.g. ``embed_wn18rr``)."""
    path = Path(path)
    if path.exists():
        return path
    preset = PRESETS / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if preset.exists() and len(path.parts) == 1:
        return preset
    return path


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def format_config(config: object) -> str:
    """YAML text of a config, printed at the start of every stage."""
    name = type(config).__name__
    body = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)
    return f"# {name}\n{body}"
