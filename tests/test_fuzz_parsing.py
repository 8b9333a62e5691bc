"""Property-based fuzzing (hypothesis) of what users hand the command line as text: trial lists
(CSV, whitespace, LFW pair files), training configs (dicts, YAML files, --set values) and
identity names. Every input either parses or is refused with a ValueError naming the file or
field; nothing else escapes, and no trial is ever dropped as a header."""

from __future__ import annotations

import dataclasses
import string
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facelab.cli import _overrides
from facelab.data.trials import iter_trial_rows, read_trials
from facelab.gallery.store import GalleryError, identity_name
from facelab.train.config import TrainConfig, read_options

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FOLDER = Path(tempfile.mkdtemp(prefix="facelab-fuzz-"))  # hypothesis reruns need no fixture


def _write(name: str, data: bytes) -> Path:
    path = FOLDER / name
    path.write_bytes(data)
    return path


TEXTISH = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet=string.printable + "é\u0308\x00,", max_size=300).map(str.encode),
)


@FUZZ
@given(data=TEXTISH, name=st.sampled_from(["t.csv", "pairs.txt"]))
def test_any_bytes_as_a_trial_list_parse_or_name_the_file(data: bytes, name: str) -> None:
    path = _write(name, data)
    try:
        trials = read_trials(path)
    except ValueError as exc:
        assert str(exc).startswith(str(path)), exc
    else:
        assert trials and all(t.label in (None, 0, 1) for t in trials)


NAME = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)


@FUZZ
@given(
    rows=st.lists(st.tuples(NAME, NAME), min_size=1, max_size=8),
    suffix=st.sampled_from(["", ".jpg"]),
    sep=st.sampled_from([",", " ", "\t"]),
    labelled=st.booleans(),
)
def test_no_trial_is_taken_for_a_header(
    rows: list[tuple[str, str]], suffix: str, sep: str, labelled: bool
) -> None:
    lines = [sep.join([a + suffix, b + suffix] + (["1"] if labelled else [])) for a, b in rows]
    path = _write("rows.csv", ("\n".join(lines) + "\n").encode())
    assert [row[0] for _, row in iter_trial_rows(path)] == [a + suffix for a, _ in rows]
    header = sep.join(["img1", "img2"] + (["label"] if labelled else []))
    path.write_text(header + "\n" + "\n".join(lines) + "\n")
    kept = [row[0] for _, row in iter_trial_rows(path)]
    if suffix or labelled:  # a header is recognisable: it is skipped, the trials all stay
        assert kept == [a + suffix for a, _ in rows]
    else:  # suffixless names under a suffixless header: nothing is dropped
        assert kept == ["img1"] + [a for a, _ in rows]


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@FUZZ
@given(options=st.dictionaries(st.sampled_from(sorted(FIELDS)), VALUES, max_size=4))
def test_any_config_values_give_a_config_or_a_value_error(options: dict) -> None:
    try:
        cfg = TrainConfig.from_dict(options, source="fuzz")
    except ValueError as exc:
        assert str(exc).startswith("fuzz: "), exc
    else:
        for name, value in options.items():  # what was accepted has its field's type
            kept = getattr(cfg, name)
            if HINTS[name] is float:
                assert isinstance(kept, float)
            elif HINTS[name] is int:
                assert isinstance(kept, int) and not isinstance(kept, bool)
            elif HINTS[name] is bool:
                assert kept is value


@FUZZ
@given(data=TEXTISH)
def test_any_yaml_file_is_options_or_an_error_naming_it(data: bytes) -> None:
    path = _write("config.yaml", data)
    try:
        options = read_options(path)
    except ValueError as exc:
        assert str(exc).startswith(str(path)), exc
        return
    try:
        TrainConfig.from_dict(options, source=str(path))
    except ValueError as exc:
        assert str(exc).startswith(str(path)), exc


@FUZZ
@given(key=st.sampled_from(sorted(FIELDS)), text=st.text(max_size=20))
def test_any_set_value_parses_or_is_refused(key: str, text: str) -> None:
    try:
        overrides = _overrides([f"{key}={text}"])
    except ValueError as exc:
        assert str(exc).startswith(f"--set {key}="), exc
        return
    try:
        TrainConfig.from_dict(overrides, source="command line")
    except ValueError as exc:
        assert str(exc).startswith("command line: "), exc


@FUZZ
@given(raw=st.text(max_size=12))
def test_identity_names_are_normal_printable_and_never_unknown(raw: str) -> None:
    try:
        name = identity_name(raw)
    except GalleryError as exc:
        assert "cannot be an identity name" in str(exc)
        return
    assert name == identity_name(name) and name.strip() == name and name
    assert name.casefold() != "unknown" and "\n" not in name and "\t" not in name


def test_yaml_1_1_numbers_are_numbers() -> None:
    assert TrainConfig.from_dict(yaml.safe_load("lr: 1e-3\neta_min: 1.0e-5")).lr == 0.001


@pytest.fixture(autouse=True, scope="module")
def _clean_up() -> typing.Iterator[None]:
    yield
    for path in FOLDER.iterdir():
        path.unlink()
    FOLDER.rmdir()
