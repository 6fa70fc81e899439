"""Checkpoints: round trip, checksum verification, atomic replacement."""

import numpy as np
import pytest

from minimoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_keeps_arrays_and_meta(tmp_path):
    arrays = {"a.weight": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
              "step": np.array(7)}
    save_checkpoint(tmp_path / "c.bin", arrays, {"step": 7, "config": {"x": [1, 2]}})
    loaded, meta = load_checkpoint(tmp_path / "c.bin")
    assert meta == {"step": 7, "config": {"x": [1, 2]}}
    assert loaded.keys() == arrays.keys()
    for name in arrays:
        np.testing.assert_array_equal(loaded[name], arrays[name])
        assert loaded[name].dtype == arrays[name].dtype


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_damaged_checkpoint_is_refused(tmp_path, damage):
    path = tmp_path / "c.bin"
    save_checkpoint(path, {"w": np.arange(1000.0)}, {"step": 1})
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    else:
        raw = b"PK" + raw
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted|not a minimoe checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope.bin does not exist"):
        load_checkpoint(tmp_path / "nope.bin")


def test_save_replaces_atomically_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "c.bin"
    save_checkpoint(path, {"w": np.zeros(3)}, {"step": 1})
    save_checkpoint(path, {"w": np.ones(3)}, {"step": 2})
    arrays, meta = load_checkpoint(path)
    assert meta["step"] == 2 and arrays["w"].tolist() == [1, 1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]
