"""One dataclass is the config, the JSON on disk and the command line: its fields become flags.

    add_config_arguments(parser, TrainConfig)      # --n-features, --lr (accepts "none"), ...
    cfg = config_from_args(TrainConfig, parser.parse_args())
    overrides = parse_assignments(ShapesModelConfig, ["dit_lr=1e-3", "vae_channels=32,64,64"])

Every field's type decides how its text is read (`parse_value`): `Optional[...]` fields take "none"
(the one spelling of "off" / "automatic" in every config), tuples take comma-separated items, booleans
take true/false (flags: `--x/--no-x`), `Literal[...]` fields take one of their choices; numbers must be
finite. A number's allowed range is part of its type, `Annotated[int, Range(1)]`: `check_config` refuses
a value outside it before any work, naming the flag, the value and the range (and --help shows it).
The docstring under a field is its --help text.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

_NONE = "none"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class Range:
    """The values a numeric config field allows, as metadata of its type: `Annotated[int, Range(1)]`
    (>= 1), `Annotated[float, Range(0, 1, high_open=True)]` ([0, 1)). Inside `X | None`, None is allowed
    too. Bounds are inclusive unless `*_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x) -> str:
    if x is None:
        return ""
    return str(int(x)) if isinstance(x, int) or (isinstance(x, float) and x.is_integer()) else f"{x:g}"


def field_range(cls, name: str) -> Range | None:
    """The `Range` in the type of field `name` of dataclass `cls`, if any."""
    inner, _ = unwrap_optional(typing.get_type_hints(cls, include_extras=True)[name])
    if typing.get_origin(inner) is typing.Annotated:
        return next((m for m in inner.__metadata__ if isinstance(m, Range)), None)
    return None


def flag(name: str) -> str:
    """The command-line flag of a config field: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def out_of_range(cls, name: str, value) -> str | None:
    """Why `value` is not allowed in field `name` of `cls` ("--batch-size must be an integer >= 1, got
    0."), or None when it is: not finite, or outside the field's `Range`."""
    if value is None or isinstance(value, bool):
        return None
    values = value if isinstance(value, tuple) else (value,)
    limits = field_range(cls, name)
    inner, _ = unwrap_optional(typing.get_type_hints(cls)[name])
    kind = "an integer" if inner is int else "a number"
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            return f"{flag(name)} must be a finite number, got {_shown(value)}."
        if isinstance(v, (int, float)) and limits is not None and v not in limits:
            return f"{flag(name)} must be {kind} {limits}, got {_shown(value)}."
    return None


def check_config(cfg) -> None:
    """SystemExit naming the first field of the config dataclass `cfg` whose value is not finite or
    outside its `Range` (flag, value and allowed range). Commands call it before any work, so the
    Python API refuses what the command line refuses."""
    for f in dataclasses.fields(cfg):
        why = out_of_range(type(cfg), f.name, getattr(cfg, f.name))
        if why:
            raise SystemExit(why)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a SystemExit carrying the message (the flag, the value and what
    it should be), like every other refusal of the commands, rather than usage printed and exit code 2."""

    def error(self, message: str):
        raise SystemExit(f"{self.prog}: {message} (see --help)")


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, for --help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for a, b in zip(body, body[1:], strict=False):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def unwrap_optional(hint) -> tuple[object, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _describe(hint) -> str:
    inner, optional = unwrap_optional(hint)
    if typing.get_origin(inner) is typing.Literal:
        name = " | ".join(map(str, typing.get_args(inner)))
    elif typing.get_origin(inner) is tuple:
        name = "comma-separated " + typing.get_args(inner)[0].__name__ + "s"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or 'none'" if optional else name


def parse_value(cls, name: str, text: str):
    """The value of field `name` of dataclass `cls` written as `text`; ValueError says what was expected."""
    hint = typing.get_type_hints(cls)[name]
    inner, optional = unwrap_optional(hint)
    if optional and text.strip().lower() == _NONE:
        return None
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(map(str, choices))}")
        return text
    if origin is tuple:
        item = typing.get_args(inner)[0]
        try:
            value = tuple(item(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"{text!r} is not {_article(_describe(hint))}") from None
    elif inner is bool:
        if text.lower() not in (*_TRUE, *_FALSE):
            raise ValueError(f"{text!r} is not a bool (true or false)")
        return text.lower() in _TRUE
    else:
        try:
            value = inner(text)
        except (TypeError, ValueError):
            raise ValueError(f"{text!r} is not {_article(_describe(hint))}") from None
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if origin is tuple else (value,))):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _article(name: str) -> str:
    return ("an " if name[:1] in "aeiou" else "a ") + name


def _argparse_type(cls, name: str):
    def convert(text: str):
        try:
            return parse_value(cls, name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = _describe(typing.get_type_hints(cls)[name])  # argparse names it in its errors
    return convert


def _range_help(cls, name: str) -> str:
    limits = field_range(cls, name)
    return f"; {limits}" if limits is not None else ""


def _metavar(hint) -> str:
    inner, optional = unwrap_optional(hint)
    if typing.get_origin(inner) is typing.Literal:
        text = "{" + ",".join(map(str, typing.get_args(inner))) + "}"
    elif typing.get_origin(inner) is tuple:
        text = typing.get_args(inner)[0].__name__.upper() + ",..."
    else:
        text = getattr(inner, "__name__", "VALUE").upper()
    return f"{text}|none" if optional else text


def _shown(default) -> str:
    if default is None:
        return _NONE
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """A `--field-name` flag per field of `cls`: required when the field has no default,
    `--field/--no-field` for booleans, "none" for optional fields, one of the choices for
    `Literal[...]` fields; the field's docstring (and its default) is the help."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        doc = docs.get(f.name, "").replace("%", "%%")  # argparse reads help as a %-format string
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        convert, metavar = _argparse_type(cls, f.name), _metavar(hints[f.name])
        if default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, type=convert, metavar=metavar, help=doc)
        elif hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
        else:
            shown = f"default: {_shown(default)}{_range_help(cls, f.name)}".replace("%", "%%")
            help_text = f"{doc} ({shown})".lstrip()
            parser.add_argument(flag, type=convert, default=default, metavar=metavar, help=help_text)


def config_from_args(cls, args: argparse.Namespace):
    """The `cls` instance the flags of `add_config_arguments` describe."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def parse_assignments(cls, items: list[str], flag: str = "--set") -> dict:
    """["dit_lr=1e-3", "vae_channels=32,64,64"] -> {field: typed value} of dataclass `cls`."""
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"{flag} {item!r}: expected FIELD=VALUE with FIELD one of {sorted(names)}")
        try:
            out[name] = parse_value(cls, name, value)
        except ValueError as e:
            raise SystemExit(f"{flag} {item!r}: {e}") from None
    return out


def check_device(device: str, flag_name: str = "--device") -> None:
    """SystemExit unless `device` names a torch device this machine has."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SystemExit(f"{flag_name} {device!r} is not a torch device: use cpu, cuda or cuda:N.") from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (where.index or 0) >= count:
            raise SystemExit(
                f"{flag_name} {device}: this machine has {count} CUDA GPU(s); use cpu or cuda:N."
            )
    elif where.type not in ("cpu", "mps", "xpu"):
        raise SystemExit(f"{flag_name} {device}: fluxsae trains on cpu or cuda.")


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise SystemExit(f"--threads must be an integer >= 1 (or left out: torch's choice), got {threads}.")


def dictionary_command(cls, argv, description: str, *, work_help: str, out_help: str):
    """The command line of a command that makes a dictionary from a harvest (train_sae, build_itda):
    `--work` (required), `--out`, `--overwrite`, `--device`, `--threads` and a flag per field of `cls`.
    Every value is checked (`check_config`, the device, the folders) before anything runs; then it sets
    up logging and the thread count and returns (the `cls` instance, the parsed arguments)."""
    p = CommandParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help=work_help)
    p.add_argument("--out", type=Path, default=None, help=out_help)
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace a different dictionary already in OUT/<site>/ (refused otherwise)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the dictionary is trained / built (cpu, cuda)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; >= 1)"
    )
    add_config_arguments(p, cls)
    args = p.parse_args(argv)
    cfg = config_from_args(cls, args)
    check_config(cfg)
    check_threads(args.threads)
    check_device(args.device)
    for name in ("work", "out"):
        folder = getattr(args, name)
        if folder is not None and folder.exists() and not folder.is_dir():
            raise SystemExit(f"--{name} {folder} is a file; pass a folder.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    return cfg, args
