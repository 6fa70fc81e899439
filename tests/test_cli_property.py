"""A property over the whole `minimoe train` command line: Hypothesis draws configs (a TOML file and
--set overrides of every key, with values of every type, valid and not) and flags, and paths that are
files, directories, missing, under a file, not UTF-8, or the directory of an existing run. Every draw
either trains (a checkpoint at step 1 or 2 in its out_dir) or ends with exit status 2 and exactly one
line on stderr, never a traceback; and no draw changes a file of the existing run."""

import contextlib
import dataclasses
import io
import itertools
import json
import math
import typing

import pytest
from helpers import generated_text
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minimoe.checkpoint import load_checkpoint
from minimoe.cli import main
from minimoe.config import Config

SMALL = ["model.n_layer=1", "model.n_embd=8", "model.n_head=2", "model.block_size=6", "train.batch_size=2",
         "train.eval_batches=1", "train.sample_tokens=3", "train.max_steps=2"]
PATH_KEYS = ("data.path", "train.out_dir")
CHOICES = {"train.device": ["cpu", "auto", "cuda", "gpu"], "train.precision": ["float32", "float64", "bfloat16"],
           "model.noisy_gate_policy": ["", "Jitter", "RSample"]}


def config_keys() -> dict[str, typing.Any]:
    """Every "section.key" of the config with its type, read off the dataclasses themselves."""
    keys, config = {}, Config()
    for section in dataclasses.fields(config):
        for name, kind in typing.get_type_hints(type(getattr(config, section.name))).items():
            keys[f"{section.name}.{name}"] = kind
    return keys


KEYS = config_keys()
ANY_VALUE = st.one_of(st.integers(-3, 7), st.sampled_from([0.0, 0.5, 1e-3, 2.0, -1.0, math.nan, math.inf, 1e30]),
                      st.booleans(), st.text(max_size=4), st.lists(st.integers(-1, 4), max_size=3))


def value_for(kind: typing.Any, key: str) -> st.SearchStrategy:
    """Mostly a value of the key's own type in a small range (so that valid draws stay quick to train),
    sometimes one of any type."""
    own = {int: st.integers(-2, 5), float: st.sampled_from([0.0, 0.01, 0.1, 0.9, 1.0, -0.5, math.nan, math.inf]),
           bool: st.booleans(), str: st.sampled_from(CHOICES.get(key, ["", "x", "\n", "é"]))}
    return st.one_of(own.get(kind, st.lists(st.integers(-1, 4), max_size=3)), ANY_VALUE)


def toml_literal(value: typing.Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    return str(value)


PATH_KINDS = ("fresh", "corpus", "empty_dir", "file", "under_file", "binary", "empty_file", "nul", "existing_run")


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[list[tuple[str, typing.Any]], dict[str, str], str, list[str]]:
    """(overrides, path kind per path key, config file kind, flags)."""
    # Weighted towards draws that train, so that both outcomes are drawn often.
    overrides = draw(st.lists(st.sampled_from(sorted(set(KEYS) - set(PATH_KEYS))).flatmap(
        lambda key: st.tuples(st.just(key), value_for(KEYS[key], key))), max_size=2))
    paths = {"data.path": draw(st.sampled_from(["corpus"] * 8 + list(PATH_KINDS))),
             "train.out_dir": draw(st.sampled_from(["fresh"] * 8 + list(PATH_KINDS)))}
    config_file = draw(st.sampled_from(["none"] * 6 + ["toml"] * 2 + ["invalid_toml", "binary", "missing",
                                                                       "directory"]))
    flags = ["--until", str(draw(st.sampled_from([1, 1, 1, 2, 0, -1])))]
    if draw(st.booleans()) and draw(st.booleans()):
        flags.append("--resume")
    if draw(st.booleans()) and draw(st.booleans()) and paths["train.out_dir"] != "existing_run":
        flags.append("--overwrite")  # replacing the existing run is a change asked for, not one to forbid
    return overrides, paths, config_file, flags


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_property")
    (root / "corpus.txt").write_text(generated_text(80))
    (root / "file.txt").write_text("a file\n")
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00\x81 not UTF-8")
    (root / "empty.txt").write_text("")
    existing = root / "existing_run"
    assert main(["train", *(arg for s in [*SMALL, f"data.path={root / 'corpus.txt'}", f"train.out_dir={existing}"]
                            for arg in ("--set", s))]) == 0
    return root


def snapshot(directory):
    """Every file of a run (the lock's pid is not part of the run)."""
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.name != ".lock"}


counter = itertools.count()


def make_path(kind: str, root, unique: str) -> str:
    return {"fresh": str(root / f"fresh-{unique}"), "corpus": str(root / "corpus.txt"),
            "empty_dir": str(root / f"empty-{unique}"), "file": str(root / "file.txt"),
            "under_file": str(root / "file.txt" / "below"), "binary": str(root / "binary.bin"),
            "empty_file": str(root / "empty.txt"), "nul": str(root / "nul\x00name"),
            "existing_run": str(root / "existing_run")}[kind]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=command_lines())
def test_every_command_line_trains_or_ends_in_one_line(playground, drawn):
    overrides, paths, config_file, flags = drawn
    unique = str(next(counter))
    (playground / f"empty-{unique}").mkdir()
    path_values = {key: make_path(kind, playground, unique) for key, kind in paths.items()}
    sets = [*SMALL, *(f"{key}={toml_literal(value)}" for key, value in overrides),
            *(f"{key}={json.dumps(value)}" for key, value in path_values.items())]
    argv = ["train", *(arg for s in sets for arg in ("--set", s)), *flags]
    if config_file != "none":
        config_path = {"missing": playground / "missing.toml", "directory": playground,
                       "binary": playground / "binary.bin"}.get(config_file, playground / f"config-{unique}.toml")
        if config_file == "toml":
            section, name, value = "train", "eval_interval", overrides[0][1] if overrides else 1
            config_path.write_text(f"[{section}]\n{name} = {toml_literal(value)}\n")
        elif config_file == "invalid_toml":
            config_path.write_text("[model\nn_layer = \n")
        argv[1:1] = ["--config", str(config_path)]
    before = snapshot(playground / "existing_run")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    assert snapshot(playground / "existing_run") == before, argv
    event(f"exit status {status}")
    if status == 0:
        out_dir = path_values["train.out_dir"]
        assert load_checkpoint(f"{out_dir}/checkpoint.bin")[1]["step"] >= 1, argv
    else:
        assert status == 2, (argv, err.getvalue())
        lines = err.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("minimoe train: error: "), (argv, err.getvalue())
