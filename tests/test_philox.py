"""cuda/philox.py's NumPy reference: Philox4x32-10 against the generator's published known answers, and
the draws built on it. (The GPU kernel is compared with this reference in test_gpu_kernels.py.)"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimoe.cuda.philox import philox, uniform_reference

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter words, key words, result words.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    block = philox(np.array([counter], dtype=np.uint32), key[0] | key[1] << 32)
    assert tuple(int(word) for word in block[0]) == expected


def test_philox_known_answers_side_by_side():
    """The same blocks computed together: the vectorised rounds keep the counters apart."""
    counters = np.array([counter for counter, _, _ in KNOWN_ANSWERS[:2]], dtype=np.uint32)
    for key in (0, 0xFFFFFFFF_FFFFFFFF):
        together = philox(counters, key)
        alone = np.concatenate([philox(counters[i:i + 1], key) for i in range(2)])
        np.testing.assert_array_equal(together, alone)


@given(size=st.integers(1, 2000), key=st.integers(0, 2**64 - 1), counter=st.integers(0, 2**63))
def test_uniform_draw_is_the_counters_words_in_order(size, key, counter):
    """Number i of a draw is word i % 4 of counter + i // 4; a draw that starts later continues it."""
    numbers = uniform_reference(size, key, counter)
    assert numbers.dtype == np.float32 and numbers.shape == (size,)
    assert np.all((numbers >= 0) & (numbers < 1))
    first_block = philox(np.array([[counter & 0xFFFFFFFF, counter >> 32, 0, 0]], dtype=np.uint32), key)[0]
    np.testing.assert_array_equal(numbers[:4], ((first_block >> 8) * 2.0**-24).astype(np.float32)[:size])
    if size > 4:
        np.testing.assert_array_equal(uniform_reference(size - 4, key, counter + 1), numbers[4:])


def test_uniform_draws_look_uniform():
    """Mean, variance and a 16-bin histogram of 400,000 numbers within 5 standard errors of Uniform(0, 1)."""
    numbers = uniform_reference(400_000, 0x243F6A8885A308D3, 0).astype(np.float64)
    n = len(numbers)
    assert abs(numbers.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(numbers.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    counts, _ = np.histogram(numbers, bins=16, range=(0, 1))
    expected = n / 16
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected * (1 - 1 / 16)))
