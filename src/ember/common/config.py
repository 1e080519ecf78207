"""Config = one flat dataclass per recipe; this file turns it into CLI flags and back.

    ember pretrain --preset=tiny --lr=3e-4 --model.n_layer=4 --dry-run
    ember pretrain --config=runs/demo/pretrain/config.json      # replay a saved run exactly

Field docs come from the trailing `# comment` on each field line, so the dataclass is the only place
a setting is described. Validation lives in the dataclass' `__post_init__` (via `require`), and runs
again after every override, so a bad value fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import json
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

from ember.common.errors import UserError

Presets = dict[str, Callable[[], Any]]  # name -> function returning a Config


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a UserError naming the field, the value and what is allowed, unless `ok`."""
    if not ok:
        raise UserError(f"config field '{name}' = {value!r} is not allowed: {allowed}")


# ---------------------------------------------------------------------------- types and values

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _optional_inner(tp):
    """X for Optional[X] / X | None, else None."""
    if get_origin_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def get_origin_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{type_name(inner)} or none"
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"comma-separated list of {type_name(args[0]) if args else 'str'}"
    return getattr(tp, "__name__", str(tp))


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_value(text: str, tp, name: str) -> Any:
    """Convert CLI text to the field's type, or raise a UserError naming field, value and type."""
    def bad():
        return UserError(f"config field '{name}' = {text!r} is not a valid {type_name(tp)}")

    inner = _optional_inner(tp)
    if inner is not None:
        return None if text.lower() in ("none", "null") else parse_value(text, inner, name)
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        raise bad()
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else str
        if text.startswith("["):  # JSON list also accepted: --betas=[0.9,0.95]
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise bad() from None
            vals = [check_value(x, item_tp, name) for x in items]
        else:
            vals = [parse_value(t.strip(), item_tp, name) for t in text.split(",") if t.strip()]
        return tuple(vals) if origin is tuple else vals
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise bad()
    if tp is int:
        try:
            return int(text)
        except ValueError:
            try:  # 1e6 is a common way to write an int; accept it only when exact
                f = float(text)
            except ValueError:
                raise bad() from None
            if f.is_integer():
                return int(f)
            raise bad() from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise bad() from None
    if tp is str:
        return text
    if tp is Any:
        return text
    raise bad()


def check_value(value: Any, tp, name: str) -> Any:
    """Check a JSON value against the field's type (used by --config replay); returns it normalized."""
    def bad():
        return UserError(f"config field '{name}' = {value!r} is not a valid {type_name(tp)}")

    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else check_value(value, inner, name)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        vals = [check_value(v, args[0] if args else Any, name) for v in value]
        return tuple(vals) if origin is tuple else vals
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    return value


# ---------------------------------------------------------------------------- dict <-> dataclass

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flat_names(cls, prefix: str = "") -> list[str]:
    """All settable dotted names: ['lr', 'model.n_layer', ...]."""
    names = []
    for name, tp in _hints(cls).items():
        if name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        if _is_dataclass_type(tp):
            names += flat_names(tp, prefix + name + ".")
        else:
            names.append(prefix + name)
    return names


def _unknown(key: str, cls, where: str, prefix: str = "") -> UserError:
    valid = flat_names(cls, prefix)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}' in {where}.{hint} Valid keys are listed by --help.")


def from_dict(cls, data: dict, where: str = "config", prefix: str = ""):
    """Build `cls` from a (possibly partial) dict, strictly: unknown keys and wrong types fail."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object for '{prefix.rstrip('.') or cls.__name__}', got {data!r}")
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(prefix + key, cls, where, prefix)
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = from_dict(tp, value, where, prefix + key + ".")
        else:
            kwargs[key] = check_value(value, tp, prefix + key)
    return cls(**kwargs)


def revalidate(cfg):
    """Re-run __post_init__ checks (nested first) after fields were set one by one."""
    changes = {f.name: revalidate(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if dataclasses.is_dataclass(getattr(cfg, f.name))}
    return dataclasses.replace(cfg, **changes)


def override(cfg, key: str, text: str):
    """Set dotted `key` on cfg from CLI text, in place and unchecked: the fields may only be consistent once
    every override is in (e.g. --steps=...,toxicity then --toxic_words=...), so parse() validates the result."""
    target, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(type(target))
        if part not in {f.name for f in dataclasses.fields(target)}:
            raise _unknown(key, type(cfg), "the command line")
        tp = hints[part]
        if i < len(parts) - 1:
            if not _is_dataclass_type(tp):
                raise _unknown(key, type(cfg), "the command line")
            target = getattr(target, part)
        elif _is_dataclass_type(tp):
            raise UserError(f"'{key}' is a group of settings; set its fields, e.g. --{key}.{dataclasses.fields(tp)[0].name}=...")
        else:
            setattr(target, part, parse_value(text, tp, key))
    return cfg


def load_json(cls, path: str):
    """A config saved by a run: either config.json itself or a stage's meta.json (its 'config' key)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config={path}: no such file. Pass a config.json or meta.json written by a run.")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config={path}: not valid JSON ({e}). Pass a config.json written by a run.") from None
    if isinstance(data, dict) and "config" in data and "stage" in data:
        data = data["config"]
    return from_dict(cls, data, where=str(p))


# ---------------------------------------------------------------------------- the command line

@dataclasses.dataclass
class Parsed:
    cfg: Any
    dry_run: bool = False
    force: bool = False
    help: bool = False


def parse(cls, argv: list[str], presets: Presets | None = None) -> Parsed:
    """--preset/--config choose the base config; every other --key=value overrides it, in order."""
    presets = presets or {}
    out = Parsed(cfg=None)
    base, overrides = None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            out.help = True
            continue
        if arg == "--dry-run":
            out.dry_run = True
            continue
        if arg == "--force":
            out.force = True
            continue
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}': settings are written --key=value (see --help)")
        key, eq, value = arg[2:].partition("=")
        key = getattr(cls, "ALIASES", {}).get(key, key)  # e.g. --from -> from_stage (a Python keyword)
        if not eq:  # --key value, or a bare boolean flag
            tp = _field_type(cls, key)
            if tp is bool or (args and args[0].startswith("--")) or not args:
                if tp is not bool and key not in ("preset", "config"):
                    if tp is None:
                        raise _unknown(key, cls, "the command line")
                    raise UserError(f"'--{key}' needs a value: --{key}=<{type_name(tp)}>")
                value = "true" if tp is bool else ""
            else:
                value = args.pop(0)
        if key in ("preset", "config"):
            if base is not None:
                raise UserError("give at most one of --preset and --config (and only once)")
            base = (key, value)
        else:
            overrides.append((key, value))
    if base is None:
        cfg = cls()
    elif base[0] == "preset":
        if base[1] not in presets:
            close = difflib.get_close_matches(base[1], list(presets), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown preset '{base[1]}'.{hint} Presets: {', '.join(presets) or 'none'}")
        cfg = presets[base[1]]()
    else:
        cfg = load_json(cls, base[1])
    for key, value in overrides:  # the base is a fresh object (cls(), a preset function, a file): set in place
        override(cfg, key, value)
    out.cfg = revalidate(cfg)
    return out


def _field_type(cls, dotted: str):
    for part in dotted.split(".")[:-1]:
        tp = _hints(cls).get(part)
        if not _is_dataclass_type(tp):
            return None
        cls = tp
    return _hints(cls).get(dotted.split(".")[-1])


def field_comments(cls) -> dict[str, str]:
    """name -> the trailing comment on its line in the class source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, names = {}, {f.name for f in dataclasses.fields(cls)}
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            line = lines[tok.start[0] - 1].strip()
            name = line.split(":", 1)[0].strip()
            if name in names and name not in comments:
                comments[name] = tok.string.lstrip("#").strip()
    return comments


def help_text(cls, presets: Presets | None, usage: str, doc: str = "") -> str:
    out = [f"usage: {usage} [--preset=NAME | --config=FILE] [--key=value ...] [--dry-run] [--force]", ""]
    if doc:
        out += [doc.strip(), ""]
    if presets:
        out += ["presets: " + ", ".join(presets), ""]
    out.append("settings (default, then why):")
    defaults = cls()

    def walk(c, obj, prefix):
        comments = field_comments(c)
        for f in dataclasses.fields(c):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out.append(f"  [{prefix}{f.name}]  {comments.get(f.name, '')}".rstrip())
                walk(type(value), value, prefix + f.name + ".")
            else:
                out.append(f"  --{prefix}{f.name}={json.dumps(value)}".ljust(40) + f"  {comments.get(f.name, '')}")

    walk(cls, defaults, "")
    out += ["", "  --dry-run                               print the resolved config as JSON and exit",
            "  --force                                 rerun even if a finished run with this config exists"]
    return "\n".join(out)
