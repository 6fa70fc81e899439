"""The inference kernels on the GPU against their NumPy references (Hypothesis-drawn shapes, outputs
poisoned before each launch), and the engine on the GPU: CUDA-graph decode steps equal eager ones, a
sequence generated alone equals itself in a batch, and the bf16 logits follow the float64 CPU model.
Marker `gpu`: skipped, with the reason, where no GPU is usable. Tolerances as in test_gpu_kernels.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gpu_kernels import assert_close, cupy_module, dtypes, poison_pool, seeds, to_gpu, to_host

pytestmark = pytest.mark.gpu


@given(rows=st.integers(1, 5), heads=st.integers(1, 4), width=st.sampled_from([3, 8, 32, 64, 80, 200, 300]),
       length=st.integers(1, 40), context=st.sampled_from([40, 64, 300]), dtype=dtypes, seed=seeds,
       poison=st.sampled_from([0xFF, 0x7F]))
def test_cache_write_and_attention_match_reference(rows, heads, width, length, context, dtype, seed, poison):
    from minimoe.cuda.kv_attention import cached_attention, write_cache

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    slots = rows + 1
    cache_k, cache_k_values = to_gpu(rng.standard_normal((slots, heads, context, width)), dtype)
    cache_v, cache_v_values = to_gpu(rng.standard_normal((slots, heads, context, width)), dtype)
    qkv, qkv_values = to_gpu(rng.standard_normal((rows, length, 3, heads, width)), dtype)
    slot = rng.permutation(slots)[:rows]
    start = rng.integers(0, context - length + 1, rows)
    write_cache(cache_k, cache_v, qkv, cupy.asarray(slot), cupy.asarray(start))
    write_cache(cache_k_values, cache_v_values, qkv_values, slot, start)
    np.testing.assert_array_equal(to_host(cache_k), cache_k_values)  # a copy: exact
    np.testing.assert_array_equal(to_host(cache_v), cache_v_values)
    poison_pool(poison)
    out = cached_attention(qkv, cache_k, cache_v, cupy.asarray(slot), cupy.asarray(start))
    expected = cached_attention(qkv_values, cache_k_values, cache_v_values, slot, start)
    assert_close(to_host(out), expected, dtype, "cached attention")



@given(rows=st.integers(1, 4), heads=st.integers(1, 3), width=st.sampled_from([16, 32, 48, 64]),
       length=st.integers(2, 150), seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_prefill_on_the_flash_kernels_matches_the_caches_attention(rows, heads, width, length, seed, poison):
    """The engine's bf16 prefill attention (the flash kernels over the packed qkv, in place) against the
    cache's NumPy reference: the prompt written from position 0, then attended over."""
    from minimoe.cuda.flash_attention import HEAD_WIDTHS, packed_attention_forward
    from minimoe.cuda.kv_attention import cached_attention, write_cache

    assert width in HEAD_WIDTHS
    rng = np.random.default_rng(seed)
    qkv, qkv_values = to_gpu(rng.standard_normal((rows, length, 3, heads, width)), "bfloat16")
    poison_pool(poison)
    out, _ = packed_attention_forward(qkv)
    cache_k, cache_v = np.zeros((2, rows, heads, length, width))
    slot, start = np.arange(rows), np.zeros(rows, dtype=np.int64)
    write_cache(cache_k, cache_v, qkv_values, slot, start)
    expected = cached_attention(qkv_values, cache_k, cache_v, slot, start)
    assert_close(to_host(out), expected, "bfloat16", "prefill attention")

@given(rows=st.integers(0, 300), k=st.integers(1, 4), experts=st.integers(4, 16),
       width=st.sampled_from([8, 64, 100, 300, 768, 1000]), features=st.sampled_from([1, 63, 64, 200, 392]),
       dtype=dtypes, gelu=st.booleans(), gather=st.booleans(), seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_grouping_grouped_linear_and_combine_match_reference(rows, k, experts, width, features, dtype, gelu, gather,
                                                             seed, poison):
    """Widths of 128 and more take several slices of K (and the finishing launch); bf16 with widths and
    features that are multiples of 8 runs on the tensor cores (grouped_linear_mma), up to 300 rows
    for one expert taking several of its 64-row passes; `gather` reads the pairs' rows through the
    grouping's order, as the experts' first layer does."""
    from minimoe.cuda.grouped import combine_pairs, group_rows, grouped_linear

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    expert_index = np.array([rng.permutation(experts + 1)[:k] for _ in range(rows)], dtype=np.int64).reshape(rows, k)
    counter = rng.integers(0, 5, experts)
    gpu_counter = cupy.asarray(counter)
    poison_pool(poison)
    order, rank, offsets = (cupy.asnumpy(a) for a in group_rows(cupy.asarray(expert_index), experts, gpu_counter))
    expected = group_rows(expert_index, experts, counter)
    for actual, reference, name in zip((order, rank, offsets), expected, ("order", "rank", "offsets")):
        np.testing.assert_array_equal(actual, reference, err_msg=name)
    np.testing.assert_array_equal(cupy.asnumpy(gpu_counter), counter)
    x, x_values = to_gpu(rng.standard_normal((rows if gather else rows * k, width)), dtype)
    weight, weight_values = to_gpu(rng.standard_normal((experts, width, features)) / width**0.5, dtype)
    bias, bias_values = to_gpu(rng.standard_normal((experts, features)), dtype)
    extra = {"order": order, "choices": k} if gather else {}
    poison_pool(poison)
    y = grouped_linear(x, cupy.asarray(offsets), weight, bias, gelu, **{n: cupy.asarray(v) if n == "order" else v
                                                                      for n, v in extra.items()})
    valid = int(offsets[-1])
    y_expected = grouped_linear(x_values, offsets, weight_values, bias_values, gelu, **extra)
    if valid:
        assert_close(to_host(y[:valid]), y_expected[:valid], dtype, "grouped linear")  # later rows: unwritten
    gate = rng.random((rows, k)).astype(np.float32)
    out, out_values = to_gpu(rng.standard_normal((rows * k, features)), dtype)
    poison_pool(poison)
    combined = combine_pairs(out, cupy.asarray(rank), cupy.asarray(expert_index), cupy.asarray(gate), experts)
    if rows:
        assert_close(to_host(combined), combine_pairs(out_values, rank, expert_index, gate.astype(np.float64), experts),
                     dtype, "combine pairs")


@given(tokens=st.integers(1, 700), experts=st.sampled_from([4, 8, 33, 64]), k=st.integers(1, 4),
       masked=st.booleans(), seed=seeds, poison=st.sampled_from([0xFF, 0x7F]))
def test_dropless_choices_match_reference(tokens, experts, k, masked, seed, poison):
    from minimoe.cuda.gating import dropless_choices

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((tokens, experts)) * 2).astype(np.float32)
    mask = rng.random(tokens) < 0.7 if masked else None
    poison_pool(poison)
    expert_index, weight = dropless_choices(cupy.asarray(logits), k, None if mask is None else cupy.asarray(mask))
    expected_index, expected_weight = dropless_choices(logits.astype(np.float64), k, mask)
    np.testing.assert_array_equal(cupy.asnumpy(expert_index), expected_index)
    np.testing.assert_allclose(cupy.asnumpy(weight), expected_weight, rtol=2e-5, atol=1e-7)


@given(rows=st.integers(1, 40), vocab=st.sampled_from([2, 50, 256]), dtype=dtypes, seed=seeds,
       poison=st.sampled_from([0xFF, 0x7F]))
def test_sampling_matches_reference(rows, vocab, dtype, seed, poison):
    """Greedy rows exactly; sampled rows: the GPU's token is one the reference allows, and its Gumbel
    score is the reference's best to float32 rounding (the two compute z and the noise in different
    precisions, so an exact tie may break the other way)."""
    from minimoe.cuda import philox
    from minimoe.cuda.sampling import counters_per_position, sample_tokens, seed_key

    cupy = cupy_module()
    rng = np.random.default_rng(seed)
    logits, values = to_gpu(rng.standard_normal((rows, vocab)) * 2, dtype)
    temperature = rng.choice([0.0, 0.5, 1.0, 1.7], rows).astype(np.float32)
    top_k = rng.choice([0, 1, 5], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.3], rows).astype(np.float32)
    key = np.array([seed_key(int(s)) for s in rng.integers(0, 1000, rows)], dtype=np.uint64)
    position = rng.integers(0, 2000, rows)
    poison_pool(poison)
    tokens = cupy.asnumpy(sample_tokens(logits, *(cupy.asarray(a) for a in (temperature, top_k, top_p, key, position))))
    expected = sample_tokens(values, temperature, top_k, top_p, key, position)
    for i in range(rows):
        if temperature[i] == 0 or tokens[i] == expected[i]:
            assert tokens[i] == expected[i], i
            continue
        z = values[i] / temperature[i]
        u = philox.uniform_reference(vocab, int(key[i]), int(position[i]) * counters_per_position(vocab))
        score = z - np.log(-np.log(np.maximum(u.astype(np.float64), philox.TINY)))
        assert abs(score[tokens[i]] - score[expected[i]]) < 1e-4 * max(1.0, abs(score[expected[i]])), i


def small_moe_model(dtype, **extra):
    from minimoe.model import GPT, GPTConfig

    config = GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, moe_every=1,
                       experts_per_layer=[8], k=2, drop_tokens=False, residual=True, **extra)
    return GPT(config).to(dtype).eval()


def test_engine_graph_steps_equal_eager_steps_and_batches_equal_alone():
    """Graphs captured on first use, or all up front (capture_graphs), give the eager steps' tokens: decode
    steps, and prefills of the prompts padded to 16 or 32 tokens."""
    from minimoe import backend
    from minimoe.engine import SamplingParams
    from minimoe.generate import generate

    backend.set_device("cuda")
    try:
        model = small_moe_model(backend.bfloat16())
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 256, rng.integers(1, 20)) for _ in range(6)]
        params = [SamplingParams(max_new_tokens=int(rng.integers(5, 40)), temperature=t, top_k=5, seed=i)
                  for i, t in enumerate([0.0, 0.8, 1.0, 0.0, 1.2, 0.5])]
        graphs = generate(model, prompts, params)
        from minimoe.engine import Engine, graph_shapes

        engine = Engine(model, slots=len(prompts), graphs=False)
        eager = [engine.submit(p, s) for p, s in zip(prompts, params)]
        engine.run_to_completion()
        assert [s.generated for s in graphs] == [s.generated for s in eager]
        captured = Engine(model, slots=len(prompts))
        captured.capture_graphs()  # every bucket up front, as the server does
        assert set(captured.graphs) == graph_shapes(len(prompts), model.config.block_size)
        assert {(8, 1), (1, 16), (8, 32)} <= set(captured.graphs)  # decode steps and prefills
        in_advance = [captured.submit(p, s) for p, s in zip(prompts, params)]
        captured.run_to_completion()
        assert [s.generated for s in in_advance] == [s.generated for s in eager]
        for prompt, setting, sequence in zip(prompts, params, graphs):
            [alone] = generate(model, [prompt], setting)
            assert alone.generated == sequence.generated
    finally:
        backend.set_device("cpu")


@settings(max_examples=3, deadline=None)
@given(seed=seeds)
def test_gpu_decode_logits_follow_the_float64_cpu_model(seed):
    """float32 on the GPU through the cache, the grouped experts and the decode attention against the
    float64 full forward on the CPU: the same logits to float32 rounding."""
    from minimoe import backend
    from minimoe.inference import KVCache, forward_cached
    from minimoe.tensor import no_grad

    tokens = np.random.default_rng(seed).integers(0, 256, 20)
    cpu_model = small_moe_model(np.float64)
    with no_grad():
        full = cpu_model(tokens[None]).logits.data[0]
    backend.set_device("cuda")
    try:
        cupy = cupy_module()
        model = small_moe_model(np.float32)
        model.load_state_dict(cpu_model.state_dict())
        cache = KVCache.allocate(model, 1, np.float32)
        head = model.wte.weight.data.T
        steps = []
        with no_grad():
            hidden = forward_cached(model, cache, cupy.asarray(tokens[None, :5]), cupy.zeros(1, np.int64),
                                    cupy.zeros(1, np.int64), cupy.ones((1, 5), bool))
            steps.append(cupy.asnumpy(hidden[0] @ head))
            for position in range(5, 20):
                hidden = forward_cached(model, cache, cupy.asarray(tokens[None, position:position + 1]),
                                        cupy.zeros(1, np.int64), cupy.full(1, position, np.int64),
                                        cupy.ones((1, 1), bool))
                steps.append(cupy.asnumpy(hidden[0] @ head))
    finally:
        backend.set_device("cpu")
    assert_close(np.concatenate(steps).astype(np.float64), full, "float32", "decode logits")
