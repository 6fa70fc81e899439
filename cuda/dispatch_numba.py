"""The dispatch kernel of cuda/dispatch.py in Numba CUDA (its own module so that importing the family
does not import Numba; the CUDA simulator also needs `cuda` to be a module-level name).

fill_slots: the buffer is written slot by slot from the inverse of the mapping table,
source_token[slot] = the token whose kept choice sits in that slot, or -1 for an empty slot. Block b
fills slot b; its threads stride over the row's words, writing the token's word or zero. Every buffer
word is written exactly once (no separate zero fill), consecutive threads touch consecutive words, so
a warp's loads and stores are coalesced, and there is no index division; rows move as words of up to
16 bytes (dispatch.row_words). Runs on the simulator with NUMBA_ENABLE_CUDASIM=1 (CI has no GPU).
"""

from numba import cuda


@cuda.jit
def fill_slots(x_words, source_token, buffer_words):
    slot = cuda.blockIdx.x
    token = source_token[slot]
    for word in range(cuda.threadIdx.x, buffer_words.shape[1], cuda.blockDim.x):
        if token >= 0:
            buffer_words[slot, word] = x_words[token, word]
        else:
            buffer_words[slot, word] = 0
