"""minimoe/scheduler.py's TextStream: the text a stream hands out is only ever text no later token can
take back, and joined it is the sequence's final text."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minimoe.engine import FINISH_LENGTH, FINISH_STOP, SamplingParams, Sequence, _extend
from minimoe.scheduler import TextStream


def run(tokens: list[int], stop: tuple[str, ...], context: int = 1000) -> tuple[Sequence, list[str]]:
    """Feed the tokens one at a time, as decode steps would, collecting each step's delta."""
    sequence = Sequence(np.array([65]), SamplingParams(max_new_tokens=len(tokens), stop=stop))
    stream, deltas = TextStream(sequence), []
    for token in tokens:
        _extend(sequence, token, context)
        news = stream.advance()
        deltas.append(news[1])
        if sequence.finish_reason is not None:
            break
    return sequence, deltas


def test_a_character_split_over_tokens_comes_out_whole():
    sequence, deltas = run(list("é!".encode()), stop=())  # é is two bytes
    assert deltas == ["", "é", "!"]
    assert "".join(deltas) == sequence.text == "é!"


def test_a_possible_stop_string_is_held_back_until_settled():
    sequence, deltas = run(list(b"ab#ab#c"), stop=("#c",))
    assert deltas == ["a", "b", "", "#a", "b", "", ""]  # "#" waits: it may start "#c"; then "#c" stops it
    assert sequence.finish_reason == FINISH_STOP and "".join(deltas) == sequence.text == "ab#ab"


@given(tokens=st.lists(st.integers(0, 255), min_size=1, max_size=40),
       stop=st.lists(st.text(alphabet="ab\u00e9#", min_size=1, max_size=3), max_size=2))
def test_deltas_joined_are_the_final_text(tokens, stop):
    """Random bytes (invalid UTF-8 included) and stop strings: what was handed out is the final text."""
    sequence, deltas = run(tokens, tuple(stop))
    assert sequence.finish_reason in (FINISH_STOP, FINISH_LENGTH)
    assert "".join(deltas) == sequence.text


def test_shutdown_hands_out_what_was_held_back():
    sequence = Sequence(np.array([65]), SamplingParams(max_new_tokens=10, stop=("#c",)))
    stream = TextStream(sequence)
    for token in b"ab#":
        _extend(sequence, token, 1000)
        stream.advance()
    assert stream.streamed == "ab"
    assert stream.end() == (0, "#", FINISH_LENGTH)
