"""One dataclass is the config, the JSON on disk and the command line: its fields become flags."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, for --help."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for a, b in zip(body, body[1:], strict=False):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """A `--field-name` flag per field of `cls`: required when the field has no default,
    `choices` for `Literal[...]` fields, `--field/--no-field` for booleans, the field's docstring as help."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, doc = "--" + f.name.replace("_", "-"), docs.get(f.name)
        if f.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, type=str, help=doc)
        elif hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hints[f.name]), default=f.default, help=doc)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=doc)


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
