"""The dispatch kernel of cuda/dispatch.py in Numba CUDA (its own module so that importing the family
does not import Numba; the CUDA simulator also needs `cuda` to be a module-level name).

fill_slots: the buffer is written slot by slot from the inverse of the mapping table,
source_token[slot] = the token whose kept choice sits in that slot, or -1 for an empty slot. Thread i
writes word i % W of slot i // W: the token's word, or zero. Every buffer word is written exactly once
(no separate zero fill), and consecutive threads touch consecutive words of one row, so a warp's
loads and stores are coalesced; rows move as words of up to 16 bytes (dispatch.row_words). Runs on
the simulator with NUMBA_ENABLE_CUDASIM=1 (CI has no GPU).
"""

from numba import cuda


@cuda.jit
def fill_slots(x_words, source_token, buffer_words):
    words = x_words.shape[1]
    for i in range(cuda.grid(1), buffer_words.shape[0] * words, cuda.gridsize(1)):
        slot, word = i // words, i % words
        token = source_token[slot]
        if token >= 0:
            buffer_words[slot, word] = x_words[token, word]
        else:
            buffer_words[slot, word] = 0
