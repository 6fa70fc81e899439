"""Generation on the CPU: the cached forward against the model's full forward (float64, every model kind),
the sparse experts against the dense buffer and the training layer, batched generation against each
prompt alone, sampling's rules and seeds, finish reasons, and every bad request refused in one line."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.cuda.grouped import combine_pairs, group_rows, grouped_linear, sparse_experts
from minimoe.cuda.kv_attention import cached_attention, write_cache
from minimoe.cuda.sampling import sample_tokens, seed_key
from minimoe.engine import FINISH_LENGTH, FINISH_STOP, Engine, GenerationError, SamplingParams
from minimoe.generate import generate
from minimoe.inference import CacheError, KVCache, buffered_experts, forward_cached
from minimoe.model import GPT, GPTConfig
from minimoe.tensor import no_grad

seeds = st.integers(0, 2**32 - 1)
KINDS = {
    "dense": {},
    "moe top-1": {"moe_every": 1, "experts_per_layer": [4], "k": 1},
    "moe top-2": {"moe_every": 1, "experts_per_layer": [4], "k": 2},
    "moe top-3": {"moe_every": 2, "experts_per_layer": [4], "k": 3},
    "residual": {"moe_every": 1, "experts_per_layer": [3], "k": 2, "residual": True},
    "pyramid": {"moe_every": 1, "experts_per_layer": [2, 4], "k": 1, "residual": True},
}


def model_of(kind: str, seed: int = 0, dtype=np.float64, **extra) -> GPT:
    shape = {"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 12}
    config = GPTConfig(init_seed=seed, drop_tokens=False, **{**shape, **KINDS[kind], **extra})
    model = GPT(config).to(dtype).eval()
    rng = np.random.default_rng(seed)
    for parameter in model.parameters():  # larger than the init, so that every path matters
        parameter.data = parameter.data + rng.standard_normal(parameter.shape).astype(dtype) * 0.3
    return model


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=6, deadline=None)
@given(seed=seeds, prompt_length=st.integers(1, 6), total=st.integers(7, 16))
def test_every_decode_step_gives_the_full_forwards_logits(kind, seed, prompt_length, total):
    """A prompt prefilled, then one token at a time: the logits of each position equal those of GPT.forward
    over the whole sequence so far (float64 rounding)."""
    model = model_of(kind, seed % 1000)
    tokens = np.random.default_rng(seed).integers(0, 50, total)
    cache = KVCache.allocate(model, 1, np.float64)
    with no_grad():
        full = model(tokens[None]).logits.data[0]
        head = model.wte.weight.data.T
        hidden = forward_cached(model, cache, tokens[None, :prompt_length], np.array([0]), np.array([0]),
                                np.ones((1, prompt_length), bool))
        steps = [hidden[0] @ head]
        for position in range(prompt_length, total):
            hidden = forward_cached(model, cache, tokens[None, position:position + 1], np.array([0]),
                                    np.array([position]), np.ones((1, 1), bool))
            steps.append(hidden[0] @ head)
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["moe top-1", "moe top-2", "moe top-3", "residual"])
def test_sparse_experts_equal_the_buffer_path_and_the_training_layer(kind):
    """On the same tokens, with nothing dropped: the chosen experts on their rows (grouped), the [E, C, d]
    buffer through dispatch and batched matmuls, and the training-time MoE layer in evaluation."""
    from minimoe.cuda.gating import dropless_choices, gate_logits
    from minimoe.inference import moe

    model = model_of(kind, 3)
    layer = model.blocks[-1].mlp
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12))
    mask = rng.random(40) < 0.8
    logits = gate_logits(x, layer.gate.weight.data)
    expert_index, weight = dropless_choices(logits, layer.settings.k, mask)
    grouping = group_rows(expert_index, len(layer.experts.fc_weight.data))  # (no counter: counts stay as they are)
    parameters = tuple(p.data for p in (layer.experts.fc_weight, layer.experts.fc_bias, layer.experts.proj_weight,
                                        layer.experts.proj_bias))
    sparse = sparse_experts(x, expert_index, weight, grouping, *parameters)
    buffered = buffered_experts(x, expert_index, weight, grouping, parameters, None)
    np.testing.assert_allclose(sparse, buffered, rtol=1e-12, atol=1e-12)
    with no_grad():
        from minimoe.tensor import Tensor

        trained, _ = layer(Tensor(x), token_mask=mask)
    counts = np.zeros(len(parameters[0]), np.int64)
    np.testing.assert_allclose(moe(x, layer, mask, counts)[mask], trained.data[mask], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(counts, np.bincount(expert_index[mask].ravel(), minlength=len(counts)))


@given(seed=seeds, rows=st.integers(0, 30), k=st.integers(1, 3), experts=st.integers(3, 6))
def test_grouping_puts_each_experts_pairs_together_in_pair_order(seed, rows, k, experts):
    rng = np.random.default_rng(seed)
    expert_index = np.array([rng.permutation(experts + 1)[:k] for _ in range(rows)], dtype=np.int64).reshape(rows, k)
    order, rank, offsets = group_rows(expert_index, experts)
    flat = expert_index.reshape(-1)
    np.testing.assert_array_equal(rank[order], np.arange(rows * k))
    for e in range(experts):
        np.testing.assert_array_equal(order[offsets[e]:offsets[e + 1]], np.flatnonzero(flat == e))
    assert offsets[-1] == np.sum(flat < experts)
    x = rng.standard_normal((rows * k, 5))
    weight = rng.standard_normal((experts, 5, 7))
    bias = rng.standard_normal((experts, 7))
    y = grouped_linear(x, offsets, weight, bias)
    for r in range(offsets[-1]):
        e = flat[order[r]]
        # float64 rounding, relative to the terms' magnitudes: a sum that cancels to near zero keeps only
        # an absolute error of that size
        magnitude = np.abs(x[r]) @ np.abs(weight[e]) + np.abs(bias[e])
        np.testing.assert_allclose(y[r], x[r] @ weight[e] + bias[e], rtol=0, atol=1e-14 * magnitude.max())
    gate = rng.random((rows, k))
    combined = combine_pairs(y, rank, expert_index, gate, experts)
    for i in range(rows):
        expected = sum(gate[i, j] * y[rank[i * k + j]] for j in range(k) if expert_index[i, j] < experts)
        np.testing.assert_allclose(combined[i], expected, rtol=1e-12, atol=1e-14)


@given(seed=seeds, rows=st.integers(1, 4), heads=st.integers(1, 3), width=st.integers(1, 8),
       length=st.integers(1, 6), context=st.integers(6, 12))
def test_cache_attention_is_causal_attention_over_what_the_slot_holds(seed, rows, heads, width, length, context):
    """Writing new tokens into slots, then attending: each query sees exactly its prefix, as the model's
    causal attention over the whole sequence would (the slot's earlier positions included)."""
    from minimoe.cuda.attention import causal_attention_forward

    rng = np.random.default_rng(seed)
    slots = rows + 2
    cache_k, cache_v = rng.standard_normal((2, slots, heads, context, width))
    slot = rng.permutation(slots)[:rows]
    start = rng.integers(0, context - length + 1, rows)
    qkv = rng.standard_normal((rows, length, 3, heads, width))
    write_cache(cache_k, cache_v, qkv, slot, start)
    out = cached_attention(qkv, cache_k, cache_v, slot, start)
    for i in range(rows):
        end = start[i] + length
        keys, values = cache_k[slot[i], :, :end], cache_v[slot[i], :, :end]
        np.testing.assert_array_equal(keys[:, start[i]:], qkv[i, :, 1].transpose(1, 0, 2))
        np.testing.assert_array_equal(values[:, start[i]:], qkv[i, :, 2].transpose(1, 0, 2))
        # The whole prefix as one causal sequence: its last `length` queries are ours.
        prefix_q = np.concatenate([np.zeros((heads, start[i], width)), qkv[i, :, 0].transpose(1, 0, 2)], axis=1)
        expected, _ = causal_attention_forward(prefix_q[None], keys[None], values[None])
        np.testing.assert_allclose(out[i], expected[0, :, start[i]:].transpose(1, 0, 2), rtol=1e-10, atol=1e-12)



@given(seed=seeds, rows=st.integers(1, 3), heads=st.integers(1, 3), width=st.integers(1, 8), length=st.integers(2, 9))
def test_prefill_attention_of_the_packed_qkv_is_the_caches_attention_from_position_0(seed, rows, heads, width,
                                                                                      length):
    """A prefill's attention as forward_cached takes it where the flash kernels apply (packed qkv, no cache)
    equals the cache's attention after the prompt is written from position 0 (here the NumPy paths)."""
    from minimoe.cuda.flash_attention import packed_attention_forward

    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((rows, length, 3, heads, width))
    cache_k, cache_v = np.zeros((2, rows, heads, length, width))
    slot, start = np.arange(rows), np.zeros(rows, dtype=np.int64)
    write_cache(cache_k, cache_v, qkv, slot, start)
    out, lse = packed_attention_forward(qkv)
    assert out.shape == (rows, length, heads, width) and lse.shape == (rows, heads, length)
    np.testing.assert_allclose(out, cached_attention(qkv, cache_k, cache_v, slot, start), rtol=1e-10, atol=1e-12)

def test_sampling_follows_its_rules():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 50)) * 3
    rows = len(logits)
    greedy = sample_tokens(logits, np.zeros(rows), np.zeros(rows, int), np.ones(rows), np.zeros(rows, np.uint64),
                           np.arange(rows))
    np.testing.assert_array_equal(greedy, logits.argmax(axis=1))
    keys = np.array([seed_key(s) for s in range(rows)], dtype=np.uint64)
    top_1 = sample_tokens(logits, np.ones(rows), np.ones(rows, int), np.ones(rows), keys, np.arange(rows))
    np.testing.assert_array_equal(top_1, greedy)  # top-k 1 keeps only the largest
    tiny_nucleus = sample_tokens(logits, np.ones(rows), np.zeros(rows, int), np.full(rows, 1e-9), keys, np.arange(rows))
    np.testing.assert_array_equal(tiny_nucleus, greedy)  # the nucleus holds at least the first token
    top_3 = [sample_tokens(logits, np.ones(rows), np.full(rows, 3), np.ones(rows), keys, np.full(rows, p))
             for p in range(40)]
    allowed = np.argsort(-logits, axis=1)[:, :3]
    assert all(token in allowed[i] for drawn in top_3 for i, token in enumerate(drawn))


def test_sampling_draws_from_the_softmax():
    """Over many positions (each a fresh draw) the tokens' frequencies are softmax(logits / T)."""
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    draws = 20000
    tokens = [int(sample_tokens(logits, np.array([0.7]), np.zeros(1, int), np.ones(1), np.array([seed_key(5)],
                                                                                                 np.uint64),
                                np.array([position]))[0]) for position in range(draws)]
    expected = np.exp(logits[0] / 0.7) / np.exp(logits[0] / 0.7).sum()
    observed = np.bincount(tokens, minlength=4) / draws
    assert np.all(np.abs(observed - expected) < 5 * np.sqrt(expected * (1 - expected) / draws))


def prompts_of(rng, count, low=1, high=9):
    return [rng.integers(0, 50, rng.integers(low, high)) for _ in range(count)]


@pytest.mark.parametrize("kind", ["dense", "moe top-2", "residual"])
def test_batched_generation_of_ragged_prompts_equals_each_prompt_alone(kind):
    model = model_of(kind, 1)
    rng = np.random.default_rng(1)
    prompts = prompts_of(rng, 5)
    settings_ = [SamplingParams(max_new_tokens=int(rng.integers(1, 9)), temperature=t, top_k=2 * i, top_p=0.9,
                                seed=i) for i, t in enumerate([0.0, 0.7, 1.0, 0.0, 1.3])]
    together = generate(model, prompts, settings_)
    for prompt, params, sequence in zip(prompts, settings_, together):
        [alone] = generate(model, [prompt], params)
        assert sequence.generated == alone.generated
        assert sequence.finish_reason == alone.finish_reason


def test_continuous_batching_admits_into_freed_slots():
    """Three sequences on a cache of two slots: the third waits, then takes a freed slot mid-run, and
    still generates what it would alone."""
    model = model_of("moe top-1", 2)
    rng = np.random.default_rng(2)
    prompts = prompts_of(rng, 3)
    lengths = [2, 9, 5]
    engine = Engine(model, slots=2)
    sequences = [engine.submit(p, SamplingParams(max_new_tokens=n, temperature=0.0)) for p, n in zip(prompts, lengths)]
    engine.admit()
    assert [s.slot for s in sequences] == [0, 1, -1] and len(engine.waiting) == 1
    while engine.busy:
        engine.step()
        engine.admit()
    assert sequences[2].slot == 0  # the first sequence's slot, freed after its 2 tokens
    for prompt, n, sequence in zip(prompts, lengths, sequences):
        [alone] = generate(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0.0))
        assert sequence.generated == alone.generated and len(sequence.generated) == n


def test_step_inputs_feed_prompts_then_last_tokens_and_pad_into_the_scratch_slot():
    """One builder for every forward's inputs (eager or captured): a sequence not started feeds its
    prompt from position 0, a running one its last token at its last position; padding rows write into
    the scratch slot, masked, as do the padding tokens of short prompts."""
    from minimoe.engine import Sequence, step_inputs

    new = Sequence(np.array([5, 6, 7]), SamplingParams(temperature=0.5, top_k=3, seed=9), slot=2)
    running = Sequence(np.array([1, 2]), SamplingParams(), generated=[8, 4], slot=0)
    inputs = step_inputs([new, running], bucket=4, length=4, scratch_slot=7)
    np.testing.assert_array_equal(inputs["tokens"], [[5, 6, 7, 0], [4, 0, 0, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(inputs["mask"], [[1, 1, 1, 0], [1, 0, 0, 0], [0] * 4, [0] * 4])
    np.testing.assert_array_equal(inputs["slot"], [2, 0, 7, 7])
    np.testing.assert_array_equal(inputs["start"], [0, 3, 0, 0])  # the running one: 2 prompt + 2 made - 1
    np.testing.assert_array_equal(inputs["last"], [2, 0, 0, 0])
    np.testing.assert_array_equal(inputs["position"], [3, 4, 0, 0])  # where each next token goes
    assert inputs["key"].tolist() == [seed_key(9), seed_key(0), 0, 0]
    assert inputs["top_k"].tolist() == [3, 0, 0, 0] and inputs["temperature"][0] == np.float32(0.5)


def test_cancelled_sequences_leave_no_trace():
    """Sequences prefilled and cancelled (a client gone, or a benchmark's warm-up) free their slots, and
    what runs there afterwards is what would run on a fresh engine."""
    model = model_of("moe top-2", 5)
    prompts = prompts_of(np.random.default_rng(5), 3)
    params = SamplingParams(max_new_tokens=6, temperature=0.9, seed=2)
    engine = Engine(model, slots=3)
    cancelled = [engine.submit(p[::-1], params) for p in prompts]
    engine.admit()
    engine.step()
    for sequence in cancelled:
        engine.cancel(sequence)
    assert not engine.busy and sorted(engine.free_slots) == [0, 1, 2]
    later = [engine.submit(p, params) for p in prompts]
    engine.run_to_completion()
    assert [s.generated for s in later] == [s.generated for s in generate(model, prompts, params)]


def test_finish_reasons_stop_strings_and_the_context():
    model = model_of("dense", 4, vocab_size=256, block_size=12)
    prompt = np.frombuffer(b"ab", dtype=np.uint8).astype(np.int64)
    [free] = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0.0))
    assert free.finish_reason == FINISH_LENGTH and len(free.generated) == 6
    stop = free.text[2:4]
    [stopped] = generate(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0.0, stop=(stop,)))
    assert stopped.finish_reason == FINISH_STOP and stopped.text == free.text[:free.text.find(stop)]
    [full] = generate(model, [prompt], SamplingParams(max_new_tokens=100, temperature=0.0))
    assert full.finish_reason == FINISH_LENGTH and full.length == 12 + 1  # the last token needs no position


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "the prompt is empty"),
    (list(range(17)), SamplingParams(), "the prompt is 17 tokens long, more than the model's context"),
    ([1], SamplingParams(max_new_tokens=0), "max new tokens must be an integer of at least 1, got 0"),
    ([1], SamplingParams(temperature=-1.0), "temperature must be a finite number >= 0"),
    ([1], SamplingParams(top_p=1.5), r"top-p must lie in \(0, 1\], got 1.5"),
    ([1], SamplingParams(top_p=0.0), r"top-p must lie in \(0, 1\], got 0.0"),
    ([1], SamplingParams(top_k=-3), "top-k must be an integer of at least 0"),
    ([1], SamplingParams(seed=-1), "the seed must be an integer of at least 0"),
    ([1], SamplingParams(stop=("",)), "stop strings must be non-empty strings"),
    ([60], SamplingParams(), r"prompt tokens must lie in 0..49, got 60..60"),
])
def test_bad_requests_are_refused_with_the_value_named(prompt, params, message):
    engine = Engine(model_of("dense"), slots=1)
    with pytest.raises(GenerationError, match=message):
        engine.submit(np.array(prompt, dtype=np.int64), params)


def test_a_cache_that_does_not_fit_is_refused_with_the_bytes_it_needs():
    with pytest.raises(CacheError, match=r"needs [\d,]+ bytes"):
        KVCache.allocate(model_of("dense"), 10**12, np.float64)
