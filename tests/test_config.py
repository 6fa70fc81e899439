"""Config loading: every key and type checked, overrides parsed as TOML."""

from pathlib import Path

import pytest

from minimoe.config import ConfigError, from_dict, load_config, to_dict


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nn_layer = 2\n[train]\nout_dir = "x"\n')
    config = load_config(str(path), ["train.max_steps=7", "optim.lr=1", "data.path=some file.txt",
                                     "train.sample_prompt='ROMEO:'"])
    assert config.model.n_layer == 2 and config.train.out_dir == "x"
    assert config.train.max_steps == 7
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.data.path == "some file.txt"
    assert config.train.sample_prompt == "ROMEO:"
    assert from_dict(to_dict(config)) == config


@pytest.mark.parametrize("override, message", [
    ("model.n_layers=2", "unknown key model.n_layers"),
    ("modle.n_layer=2", "unknown section \\[modle\\]"),
    ("model.n_layer=2.5", "model.n_layer must be int, got 2.5"),
    ("model.n_layer=true", "model.n_layer must be int, got True"),
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("model.n_embd=30", "n_embd=30 must be divisible by model.n_head=4"),
    ("train.device=tpu", "train.device must be"),
    ("max_steps=3", "--set takes section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))


@pytest.mark.parametrize("example", sorted(str(p) for p in (Path(__file__).parent.parent / "examples").glob("*.toml")))
def test_every_example_config_loads(example):
    config = load_config(example)
    assert config.train.out_dir.startswith("runs/")
