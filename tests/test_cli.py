"""The command lines' argument checks, property-based: any number given to any ranged flag of harvest,
train_sae or build_itda is either taken as that number (inside the flag's range) or refused with a
message naming the flag and the value, before any work (the work folder is never made)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training import harvest
from training.build_itda import BuildConfig
from training.cli import dictionary_command, field_range, flag
from training.train_sae import TrainConfig

COMMANDS = {"harvest": harvest.HarvestConfig, "train_sae": TrainConfig, "build_itda": BuildConfig}
RANGED = [(name, f.name) for name, cls in COMMANDS.items() for f in dataclasses.fields(cls)
          if field_range(cls, f.name) is not None]  # fmt: skip

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, 2**32, 2**62 + 1, 0.5, 1.0, 1e9]),
)


def _parse(command: str, argv: list[str], tmp_path):
    work = tmp_path / "work"
    if command == "harvest":
        return harvest.parse_args(["--out", str(work), "--sites", "transformer_blocks.3.image", *argv])
    needed = ["--work", str(work), "--acts", str(tmp_path / "acts"), "--site", "transformer_blocks.3.image"]
    return dictionary_command(COMMANDS[command], [*needed, *argv], "", work_help="", out_help="")[0]


def _inside(command: str, name: str, value) -> bool:
    cls = COMMANDS[command]
    hint = cls.__dataclass_fields__[name].type
    is_int = "int" in str(hint) and "float" not in str(hint)
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if is_int and isinstance(value, float) and not value.is_integer():
        return False
    return value in field_range(cls, name)


def test_every_ranged_flag_is_covered():
    assert len(RANGED) >= 30 and ("train_sae", "batch_size") in RANGED and ("harvest", "n_prompts") in RANGED


@pytest.mark.parametrize("command, name", RANGED, ids=[f"{c}:{n}" for c, n in RANGED])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=NUMBERS)
def test_a_number_is_taken_inside_the_range_or_refused_naming_the_flag(command, name, value, tmp_path):
    cls = COMMANDS[command]
    hint = str(cls.__dataclass_fields__[name].type)
    text = str(value)
    if "tuple" in hint:  # a list flag (matryoshka widths): the value as its one item
        value_of = lambda cfg: getattr(cfg, name)[0]  # noqa: E731
    else:
        value_of = lambda cfg: getattr(cfg, name)  # noqa: E731
    argv = [f"{flag(name)}={text}"]  # the = form: argparse reads "-1e+16" after a space as a flag
    if command == "train_sae" and name == "matryoshka_weights":
        argv += ["--matryoshka", "4"]  # one weight per width
    try:
        cfg = _parse(command, argv, tmp_path)
    except SystemExit as refused:
        message = str(refused)
        shown = (text, repr(text), str(float(value)))  # a float flag shows the number it read
        assert flag(name) in message and any(t in message for t in shown), message
        assert not (tmp_path / "work").exists()  # refused before any work
        return
    taken = value_of(cfg)
    assert _inside(command, name, value), f"{flag(name)} {text} was accepted as {taken!r}"
    assert taken == value or (isinstance(taken, float) and taken == float(value))  # a float flag rounds
    assert not (tmp_path / "work").exists()
