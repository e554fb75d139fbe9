"""One dataclass is the config, the JSON on disk and the command line: its fields become flags.

    add_config_arguments(parser, TrainConfig)      # --n-features, --lr (accepts "none"), ...
    cfg = config_from_args(TrainConfig, parser.parse_args())
    overrides = parse_assignments(ShapesModelConfig, ["dit_lr=1e-3", "vae_channels=32,64,64"])

Every field's type decides how its text is read (`parse_value`): `Optional[...]` fields take "none"
(the one spelling of "off" / "automatic" in every config), tuples take comma-separated items, booleans
take true/false (flags: `--x/--no-x`), `Literal[...]` fields take one of their choices. The docstring
under a field is its --help text.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import types
import typing
from pathlib import Path

import torch

_NONE = "none"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


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
            return tuple(item(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"{text!r} is not a {_describe(hint)}") from None
    if inner is bool:
        if text.lower() not in (*_TRUE, *_FALSE):
            raise ValueError(f"{text!r} is not a bool (true or false)")
        return text.lower() in _TRUE
    try:
        return inner(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a {_describe(hint)}") from None


def _argparse_type(cls, name: str):
    def convert(text: str):
        try:
            return parse_value(cls, name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = _describe(typing.get_type_hints(cls)[name])  # argparse names it in its errors
    return convert


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
            help_text = f"{doc} (default: {_shown(default).replace('%', '%%')})".lstrip()
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


def dictionary_command(cls, argv, description: str, *, work_help: str, out_help: str):
    """The command line of a command that makes a dictionary from a harvest (train_sae, build_itda):
    `--work` (required), `--out`, `--device`, `--threads` and a flag per field of `cls`. Sets up
    logging and the thread count; returns (the `cls` instance, the parsed arguments)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help=work_help)
    p.add_argument("--out", type=Path, default=None, help=out_help)
    p.add_argument("--device", default="cpu", help="where the dictionary is trained / built (cpu, cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_config_arguments(p, cls)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    return config_from_args(cls, args), args
