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
    # values that would train wrongly, or lose a run's work, refused before anything starts
    ("optim.lr=-1", "optim.lr must be a finite number > 0, got -1.0"),
    ("optim.lr=0", "optim.lr must be a finite number > 0, got 0.0"),
    ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.lr=inf", "optim.lr must be a finite number > 0, got inf"),
    ("optim.min_lr=-1", r"optim.min_lr must be in \[0, optim.lr=0.003\], got -1.0"),
    ("optim.min_lr=1", r"optim.min_lr must be in \[0, optim.lr=0.003\], got 1.0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be at least 0, got -5"),
    ("optim.weight_decay=-1", "optim.weight_decay must be a finite number >= 0, got -1.0"),
    ("optim.beta1=2", r"optim.beta1 must be in \[0, 1\), got 2.0"),
    ("optim.beta2=1", r"optim.beta2 must be in \[0, 1\), got 1.0"),
    ("optim.eps=0", "optim.eps must be a finite number > 0, got 0.0"),
    ("train.grad_clip=-1", "train.grad_clip must be a finite number >= 0 .0 turns clipping off., got -1.0"),
    ("model.mlp_ratio=0", "model.mlp_ratio must be at least 1, got 0"),
    ("train.seed=-1", "train.seed must be at least 0, got -1"),
    ("model.init_seed=-3", "model.init_seed must be at least 0, got -3"),
    ("train.temperature=-1", "train.temperature must be a finite number >= 0"),
    ("train.top_k=-3", "train.top_k must be at least 0, got -3"),
    ("train.sample_prompt=''", "train.sample_prompt must be 1 to model.block_size=64 bytes long"),
    ("data.corpus='wiki'", "data.corpus must be 'shakespeare' or 'dictionaries', got 'wiki'"),
    ("data.val_fraction=1", "data.val_fraction must be strictly between 0 and 1, got 1.0"),
    ("train.out_dir=''", "train.out_dir must be a directory path, got ''"),
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


def test_a_dense_model_ignores_the_expert_counts():
    """moe_every=0 leaves experts_per_layer unread, as every other MoE setting: a list of any length loads
    and gives no MoE layer (a command line with one ended in a traceback; the CLI property test found it)."""
    config = load_config(None, ["model.moe_every=0", "model.n_layer=1", "model.experts_per_layer=[0, 0]"])
    assert config.model.experts_in_block() == [0]
    with pytest.raises(ConfigError, match="model.moe_every=2 leaves no MoE layer in 1 blocks"):
        load_config(None, ["model.moe_every=2", "model.n_layer=1", "model.experts_per_layer=[0, 0]"])
