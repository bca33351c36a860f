"""Typed configuration: dataclasses loaded from YAML (``safe_load``) or dicts, validated.

Both sides' configs are trees of dataclasses.  A field may carry metadata ``range=(lo, hi)``
(inclusive; ``None`` for an open end) or ``choices=(...)``.  Every error names the dotted key,
the bad value and what is allowed, so a typo in a YAML file fails at start, not mid-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def option(default: Any, *, range: tuple | None = None, choices: tuple | None = None, doc: str = "") -> Any:
    """A dataclass field with validation metadata; a dataclass type as ``default`` makes a section."""
    meta = {"range": range, "choices": choices, "doc": doc}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (leave the config out to run on the defaults)") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _describe(field: dataclasses.Field, hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)][0]
        return _describe(field, inner) + " or null"
    rng, choices = field.metadata.get("range"), field.metadata.get("choices")
    if choices:
        return "one of " + ", ".join(repr(c) for c in choices)
    if rng:
        lo, hi = rng
        return f"{getattr(hint, '__name__', hint)} in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
    return getattr(hint, "__name__", str(hint))


def _check(value: Any, hint: Any, key: str, field: dataclasses.Field) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check(value, args[0], key, field)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=key + ".")
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list")
        return [_check(v, item, f"{key}[{i}]", field) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: {value!r} is not a mapping")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML 1.1 reads 1e-8 (no dot) as a string
    if hint is float and isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}: nan is not allowed; allowed: {_describe(field, hint)}")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: {value!r} has type {type(value).__name__}; allowed: {_describe(field, hint)}")
    choices, rng = field.metadata.get("choices"), field.metadata.get("range")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not allowed; allowed: {_describe(field, hint)}")
    if rng:
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{key}: {value!r} is out of range; allowed: {_describe(field, hint)}")
    return value


def build(cls: type[T], data: dict | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating every key."""
    data = {} if data is None else data
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {data!r} is not a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {name: _check(data[name], hints[name], prefix + name, fields[name]) for name in fields if name in data}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    obj = cls(**kwargs)
    for name, f in fields.items():
        if name not in kwargs and not dataclasses.is_dataclass(hints[name]):
            _check(getattr(obj, name), hints[name], prefix + name, f)
    return obj


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` into a copy of ``base``; dotted keys ('a.b': 1) are expanded."""
    out = dict(base)
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            value = merge({}, {rest: value})
        if isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = merge(out[head], value)
        else:
            out[head] = value
    return out


def load(cls: type[T], source: str | Path | dict | T | None = None, **overrides: Any) -> T:
    """Config from a YAML path, a dict, an instance or None (defaults), with keyword overrides."""
    if isinstance(source, cls) and not overrides:
        return source
    if isinstance(source, cls):
        source = dataclasses.asdict(source)
    elif isinstance(source, (str, Path)):
        source = read_yaml(source)
    return build(cls, merge(source or {}, overrides))


def reference(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, allowed, default, doc) for every leaf option: the source of docs/configuration.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += reference(hint, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((prefix + f.name, _describe(f, hint), default, f.metadata.get("doc", "")))
    return rows


def reference_markdown(cls: type) -> str:
    """The Markdown table of every key of ``cls``, as docs/configuration.md carries it."""
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["| Key | Allowed | Default | Meaning |", "|---|---|---|---|"]
    for key, allowed, default, doc in reference(cls):
        lines.append(f"| `{key}` | {cell(allowed)} | `{json.dumps(default)}` | {cell(doc)} |")
    return "\n".join(lines) + "\n"


def commented_yaml(cls: type, header: str, width: int = 100) -> str:
    """Every key of ``cls`` as YAML with its default, each after its ``doc`` as a comment (``init``).

    Built from the same fields as :func:`reference_markdown`, so the file, the documentation and
    the loader cannot disagree; loading the result gives the defaults.
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()] + [""]

    def comment(text: str, indent: str) -> None:
        lines.extend(
            textwrap.wrap(text, width - len(indent) - 2, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        )

    def walk(c: type, indent: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            hint, doc = hints[f.name], f.metadata.get("doc", "")
            if dataclasses.is_dataclass(hint):
                if not indent:
                    lines.append("")
                if doc:
                    comment(doc, indent)
                lines.append(f"{indent}{f.name}:")
                walk(hint, indent + "  ")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = _describe(f, hint)
            comment(f"{doc} Allowed: {allowed}." if doc else f"Allowed: {allowed}.", indent)
            lines.append(f"{indent}{f.name}: {_yaml_value(default)}")

    walk(cls, "")
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    """One value in YAML flow style, as ``yaml.safe_load`` reads it back (4e-05 needs its '.0')."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return text.removesuffix("\n...").strip()


def write_commented(cls: type, path: str, header: str, *, force: bool = False) -> str:
    """Write :func:`commented_yaml` to ``path`` ('-': stdout); refuses to replace a file unless ``force``.

    Returns what was done, for the command to print; raises ``FileExistsError`` or ``OSError``.
    """
    text = commented_yaml(cls, header)
    if path == "-":
        sys.stdout.write(text)
        return ""
    target = Path(path)
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; --force replaces it")
    target.write_text(text)
    return f"wrote {target}: every key with its default; edit what you need, delete the rest"
