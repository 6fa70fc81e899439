"""Checkpoints: round trip, checksum verification, atomic replacement, expert part files."""

import numpy as np
import pytest

from minimoe.checkpoint import CheckpointError, load_checkpoint, part_path, save_checkpoint, save_part


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


def expert_parts(path, step, parts):
    """Random expert arrays [4, 3] cut into `parts` part files, the dense arrays and the manifest."""
    rng = np.random.default_rng(step)
    experts, dense = rng.standard_normal((4, 3)), rng.standard_normal(5)
    for part in range(parts):
        save_part(path, step, part, parts, {"experts": experts[part * 4 // parts:(part + 1) * 4 // parts]})
    save_checkpoint(path, {"dense": dense}, {"step": step},
                    [part_path(path, step, part, parts).name for part in range(parts)])
    return experts, dense


def test_expert_parts_join_in_global_order_and_stale_parts_go(tmp_path):
    path = tmp_path / "c.bin"
    expert_parts(path, 1, 4)
    experts, dense = expert_parts(path, 2, 2)
    arrays, meta = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["experts"], experts)
    np.testing.assert_array_equal(arrays["dense"], dense)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.bin.step2.part0-of-2", "c.bin.step2.part1-of-2"]


def test_a_half_written_save_leaves_the_previous_checkpoint_whole(tmp_path):
    """Parts of step 2 on disk but no manifest for them yet (a crash between the two): step 1 loads."""
    path = tmp_path / "c.bin"
    experts, _ = expert_parts(path, 1, 2)
    save_part(path, 2, 0, 2, {"experts": np.ones((2, 3))})
    arrays, meta = load_checkpoint(path)
    assert meta["step"] == 1
    np.testing.assert_array_equal(arrays["experts"], experts)


def test_a_missing_or_foreign_part_is_refused(tmp_path):
    path = tmp_path / "c.bin"
    expert_parts(path, 1, 2)
    save_part(path, 7, 0, 2, {"experts": np.ones((2, 3))})
    part_path(path, 7, 0, 2).replace(part_path(path, 1, 1, 2))
    with pytest.raises(CheckpointError, match="belongs to step 7, part 0 of 2"):
        load_checkpoint(path)
    part_path(path, 1, 1, 2).unlink()
    with pytest.raises(CheckpointError, match=r"c.bin.step1.part1-of-2 does not exist"):
        load_checkpoint(path)
