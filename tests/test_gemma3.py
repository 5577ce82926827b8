"""Gemma 3 (gemma3.py) against transformers' Gemma3ForCausalLM, the reference implementation.

What Gemma 3 changes only shows under the right conditions, so every config
here is built to expose it: seven layers or more (five local, then a global
one, then local again), sequences of several windows (a window bug is
invisible before the sequence outgrows it, HF #31781), two different RoPE
bases with the linear scaling on, a query scale (query_pre_attn_scalar) that
is not head_dim, grouped-query and multi-query attention. All weights are
random, the QK-norm and sandwich norm weights included. The ring-buffer cache
of the local layers is checked against the full forward through many wraps,
with chunked prefill (chunks shorter and longer than the window) and with
left padding.
"""

import dataclasses

import pytest
import torch

import hf_oracle as oracle
from gemma3 import CONFIGS, Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextModel, KVCache, RingKVCache, generate, stream

# float32 parity bound on logits of O(1-10), as in test_gemma2.py: the same
# math in another order leaves ~1e-5 relative. Measured on a CPU: 0 for the
# full forward (the same operations in the same order), below 1e-5 through the
# cache (keys in ring order, so softmax sums in another order).
ATOL = 1e-4
# A result that differs from the reference by more than this is a different
# computation, not rounding: 100x the parity bound.
DIFFERENT = 100 * ATOL

TINY = dict(
    vocab_size=256,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=7,  # five local, one global (layer 5), one local
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query
    head_dim=16,  # not hidden / heads = 12
    query_pre_attn_scalar=24,  # not head_dim, as in gemma-3-27b (168 against 128)
    sliding_window=5,
    rope_theta=1_000_000.0,  # global layers, as released
    rope_local_base_freq=10_000.0,  # local layers, as released
    rope_scaling={"rope_type": "linear", "factor": 8.0},  # global layers of 4B, 12B, 27B
    max_position_embeddings=96,
)
W = TINY["sliding_window"]
T = 36  # more than 7 windows

VARIANTS = {
    "gqa_7_layers_window_5_linear_scaling": TINY,
    "no_scaling_as_270m_and_1b": dict(TINY, rope_scaling=None),
    "mqa_13_layers_two_global_window_4_head_dim_24": dict(
        TINY, num_hidden_layers=13, num_key_value_heads=1, head_dim=24, sliding_window=4
    ),
    "mha_query_scalar_equal_to_head_dim": dict(TINY, num_key_value_heads=4, query_pre_attn_scalar=16),
    "window_1_each_local_query_sees_only_itself": dict(TINY, sliding_window=1),
    "odd_vocab_and_small_rope_bases": dict(TINY, vocab_size=311, rope_theta=300.0, rope_local_base_freq=50.0),
}

# Weights for the generation tests: as for Gemma 2, a small embedding (0.05)
# and wide norm weights (1.5) keep a random model from echoing its last token;
# seed 0 gives a varied continuation, and the tests assert that it is varied.
GEN_WEIGHTS = dict(seed=0, embed_std=0.05, norm_std=1.5)
PROMPT = [2, 17, 101, 45, 9]


def tokens(batch, length, vocab=TINY["vocab_size"], seed=0):
    """Random token ids (batch, length), the same for the same seed."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def parity_pair():
    """(transformers, ours) with the parity config TINY, built once for this module."""
    return oracle.pair("gemma3", seed=1, **TINY)


@pytest.fixture(scope="module")
def gen_pair():
    """(transformers, ours) for the generation tests, built once for this module."""
    return oracle.pair("gemma3", **GEN_WEIGHTS, **TINY)


with_fields = oracle.with_fields


# --- logits ------------------------------------------------------------------


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=VARIANTS.keys())
def test_logits_equal_transformers(fields):
    hf, ours = oracle.pair("gemma3", seed=1, **fields)
    x = tokens(2, T, fields["vocab_size"])
    ref = oracle.hf_logits(hf, x)
    assert ref.std() > 1.0  # the tolerance is small against the logits
    torch.testing.assert_close(ours(x), ref, atol=ATOL, rtol=0)


def test_hidden_states_of_the_body_equal_transformers_last_hidden_state(parity_pair):
    hf, _ = parity_pair
    body = Gemma3TextModel(oracle.our_config("gemma3", hf))
    body.load_state_dict(hf.model.state_dict(), strict=True)
    x = tokens(2, T)
    with torch.no_grad():
        ref = hf.model(input_ids=x, use_cache=False).last_hidden_state
        torch.testing.assert_close(body(x), ref, atol=ATOL, rtol=0)  # O(1) values, float32


# Each of these is a plausible porting mistake; each must move the logits far
# beyond the parity bound, or the parity test above could not catch it.
WRONG = {
    "window_W_minus_1": dict(sliding_window=W - 1),
    "window_W_plus_1": dict(sliding_window=W + 1),
    "gemma_2_pattern_every_other_layer_global": dict(layer_types=["sliding_attention", "full_attention"] * 3 + ["sliding_attention"]),
    "global_layer_one_too_early": dict(layer_types=["sliding_attention"] * 4 + ["full_attention"] + ["sliding_attention"] * 2),
    "all_layers_local": dict(layer_types=["sliding_attention"] * 7),
    "global_base_on_local_layers": dict(rope_local_base_freq=1_000_000.0),
    "local_base_on_global_layers": dict(rope_theta=10_000.0),
    "one_base_for_both_gemma_2_style": dict(rope_theta=10_000.0, rope_local_base_freq=10_000.0),
    "no_linear_scaling": dict(rope_scaling=None),
    "scaling_on_local_layers_too": "see test_the_linear_scaling_applies_to_global_layers_only",
    "query_scale_by_head_dim": dict(query_pre_attn_scalar=TINY["head_dim"]),
}
del WRONG["scaling_on_local_layers_too"]  # needs a patched model, tested below


@pytest.mark.parametrize("fields", WRONG.values(), ids=WRONG.keys())
@torch.no_grad()
def test_a_wrong_pattern_window_or_rope_base_differs_from_transformers_far_beyond_the_tolerance(parity_pair, fields):
    hf, ours = parity_pair
    x = tokens(2, T)
    ref = oracle.hf_logits(hf, x)
    torch.testing.assert_close(ours(x), ref, atol=ATOL, rtol=0)
    assert (with_fields(ours, **fields)(x) - ref).abs().max() > DIFFERENT


@torch.no_grad()
def test_the_linear_scaling_applies_to_global_layers_only(parity_pair, monkeypatch):
    import gemma3

    hf, ours = parity_pair
    x = tokens(2, T)
    ref = oracle.hf_logits(hf, x)
    real = gemma3.rope_angles
    # Scale every layer's positions: transformers scales the global layers only.
    monkeypatch.setattr(gemma3, "rope_angles", lambda positions, head_dim, theta, factor=1.0: real(positions, head_dim, theta, 8.0))
    assert (ours(x) - ref).abs().max() > DIFFERENT


@torch.no_grad()
def test_without_qk_norm_the_logits_differ_far_beyond_the_tolerance(parity_pair):
    # The QK-norm weights are random, so (1 + w) is not the identity; a port that
    # forgot q_norm / k_norm (or applied them after RoPE) would fail parity.
    hf, ours = parity_pair
    x = tokens(2, T)
    ref = oracle.hf_logits(hf, x)
    for layer in (other := with_fields(ours)).model.layers:
        layer.self_attn.q_norm = layer.self_attn.k_norm = torch.nn.Identity()
    assert (other(x) - ref).abs().max() > DIFFERENT


@torch.no_grad()
def test_a_local_layer_at_position_i_sees_positions_i_minus_W_plus_1_to_i_and_nothing_earlier():
    # One local layer: the output at i depends on the tokens at the positions
    # its query sees, i - W < j <= i, and on no other.
    _, ours = oracle.pair("gemma3", seed=7, **dict(TINY, num_hidden_layers=1, layer_types=["sliding_attention"]))
    x = tokens(1, T)
    base = ours(x)[0]  # (T, V)
    for i in range(W, T):
        oldest_seen, newest_unseen = x.clone(), x.clone()
        oldest_seen[0, i - W + 1] = (x[0, i - W + 1] + 1) % TINY["vocab_size"]
        newest_unseen[0, i - W] = (x[0, i - W] + 1) % TINY["vocab_size"]
        assert (ours(oldest_seen)[0, i] - base[i]).abs().max() > DIFFERENT, f"position {i}"
        # A masked key gets a probability of exactly 0, so any leak would show.
        torch.testing.assert_close(ours(newest_unseen)[0, i], base[i], atol=1e-6, rtol=0, msg=f"position {i}")


def test_by_default_five_local_layers_precede_each_global_one():
    types = Gemma3TextConfig(num_hidden_layers=13).layer_types
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [5, 11]
    assert types == oracle.hf_config("gemma3", num_hidden_layers=13).layer_types


def test_layer_types_from_the_config_are_used_as_given():
    layer_types = ["full_attention", "sliding_attention"] * 3 + ["full_attention"]
    hf, ours = oracle.pair("gemma3", seed=3, **dict(TINY, layer_types=layer_types))
    assert ours.config.layer_types == layer_types
    x = tokens(2, T)
    torch.testing.assert_close(ours(x), oracle.hf_logits(hf, x), atol=ATOL, rtol=0)


# --- the ring-buffer KV cache --------------------------------------------------


def test_local_layers_cache_only_the_window_and_global_layers_the_whole_length(parity_pair):
    _, ours = parity_pair
    cache = ours.make_cache(2, 90)
    for kind, c in zip(ours.config.layer_types, cache):
        expected = (KVCache, 90) if kind == "full_attention" else (RingKVCache, W)
        assert (type(c), c.k.shape[2]) == (type(c), c.v.shape[2]) == expected
    # A generation shorter than the window needs no more than its length.
    assert {c.k.shape[2] for c in ours.make_cache(2, 3)} == {3}


def decode_in_chunks(model, x, chunks, pad=None):
    """Logits of x (B, T) fed through one cache in chunks of the given sizes."""
    B, T = x.shape
    cache = model.make_cache(B, T)
    pad = torch.zeros(B, dtype=torch.long) if pad is None else pad
    out, start = [], 0
    for size in chunks:
        slots = torch.arange(start, min(T, start + size))
        out.append(model(x[:, slots], slots, cache, pad))
        start += size
    assert start >= T
    return torch.cat(out, dim=1)  # (B, T, V)


CHUNKINGS = {
    "one_token_at_a_time_wrapping_the_ring_7_times": [1] * T,
    "prefill_longer_than_the_window_then_one_at_a_time": [9] + [1] * (T - 9),
    "chunks_of_3_shorter_than_the_window": [3] * 12,
    "chunks_of_W": [W] * 8,
    "chunks_of_8_longer_than_the_window": [8] * 5,
    "chunks_of_13_more_than_twice_the_window": [13] * 3,
    "mixed_2_7_1_11_4_then_ones": [2, 7, 1, 11, 4] + [1] * 11,
}


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@torch.no_grad()
def test_decoding_through_the_cache_in_chunks_equals_the_full_forward_at_every_position(parity_pair, chunks):
    hf, ours = parity_pair
    x = tokens(2, T)
    full = ours(x)  # (B, T, V)
    torch.testing.assert_close(full, oracle.hf_logits(hf, x), atol=ATOL, rtol=0)
    # float32 rounding only: the ring holds its keys in another order.
    torch.testing.assert_close(decode_in_chunks(ours, x, chunks), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_decoding_90_positions_wraps_the_ring_18_times_and_equals_transformers():
    hf, ours = oracle.pair("gemma3", seed=5, **TINY)
    x = tokens(1, 90, seed=3)
    ref = oracle.hf_logits(hf, x)
    torch.testing.assert_close(decode_in_chunks(ours, x, [4] + [1] * 86), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunks", [[1] * T, [8] * 5, [13] * 3], ids=["one_at_a_time", "chunks_of_8", "chunks_of_13"])
@torch.no_grad()
def test_a_left_padded_row_decoded_through_the_cache_equals_its_prompt_alone(parity_pair, chunks):
    _, ours = parity_pair
    # Row 0 is padded by 11 slots (more than two windows), row 1 not at all.
    x = tokens(2, T, seed=4)
    pad = torch.tensor([11, 0])
    got = decode_in_chunks(ours, x, chunks, pad)
    alone = ours(x[:1, 11:])  # (1, T - 11, V)
    torch.testing.assert_close(got[:1, 11:], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1:], ours(x[1:]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, T + 8])
@torch.no_grad()
def test_a_left_padded_batch_prefilled_in_chunks_as_stream_does_equals_transformers_at_every_visible_position(parity_pair, chunk):
    # Row 1 is left-padded by 13 slots; transformers gets the attention mask and
    # the position ids that its generate would pass. Chunks go through the cache
    # as stream sends them: each with the cache up to its end (KVCache.prefix).
    hf, ours = parity_pair
    x, pad = tokens(2, T, seed=8), torch.tensor([0, 13])
    visible = (torch.arange(T)[None, :] >= pad[:, None]).long()  # (B, T)
    x = x.masked_fill(visible == 0, 0)
    positions = (visible.cumsum(-1) - 1).clamp(min=0)
    ref = hf(input_ids=x, attention_mask=visible, position_ids=positions, use_cache=False).logits
    cache, got = ours.make_cache(2, T + 8), []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        seen = torch.nn.ModuleList(c.prefix(a + chunk) for c in cache)
        got.append(ours(x[:, a:b], torch.arange(a, b), seen, pad))
    mask = visible.bool()  # padding positions carry no meaning on either side
    torch.testing.assert_close(torch.cat(got, dim=1)[mask], ref[mask], atol=ATOL, rtol=0)


# --- generate ------------------------------------------------------------------


def test_greedy_generate_equals_transformers_greedy_generate_across_several_windows(gen_pair):
    hf, ours = gen_pair
    n = 40  # 5 + 40 = 45 positions, 9 windows of 5, the ring wraps 9 times
    expected = oracle.hf_greedy(hf, PROMPT, n)
    assert len(set(expected)) >= 15  # not one token repeated
    assert generate(ours, PROMPT, n) == expected


@pytest.mark.parametrize("chunk", [2, W, 8, 13])
def test_generation_after_a_prefill_in_chunks_shorter_or_longer_than_the_window_equals_transformers(gen_pair, chunk):
    hf, ours = gen_pair
    prompt = PROMPT + tokens(1, 20, seed=6)[0].tolist()  # 25 tokens, 5 windows
    expected = oracle.hf_greedy(hf, prompt, 15)
    assert len(set(expected)) >= 5
    assert [t.item() for t in stream(ours, [prompt], 15, prefill_chunk=chunk)] == expected


def test_each_prompt_of_a_left_padded_batch_gets_the_tokens_it_gets_alone(gen_pair):
    _, ours = gen_pair
    # The longest prompt is two windows long, the shortest shorter than one.
    prompts = [[2, 40], [2, 0, 77, 31, 90, 4], [2, 9, 140, 8, 200, 66, 5, 13, 250, 17, 3]]
    alone = [generate(ours, p, 20) for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)
    assert all(len(set(a)) >= 5 for a in alone)
    assert generate(ours, prompts, 20) == alone


def test_generation_stops_after_a_stop_token_and_keeps_it(gen_pair):
    _, ours = gen_pair
    free = generate(ours, PROMPT, 24)
    stop = free[5]
    assert generate(ours, PROMPT, 24, stop_tokens=(stop,)) == free[: free.index(stop) + 1]


# --- bf16 ----------------------------------------------------------------------


@torch.no_grad()
def test_bf16_model_picks_the_same_top_token_as_transformers_bf16_at_most_positions():
    hf, ours = oracle.pair("gemma3", dtype=torch.bfloat16, **GEN_WEIGHTS, **TINY)
    x = tokens(4, T)
    ref = oracle.hf_logits(hf, x).argmax(-1)  # (4, T)
    assert (ref == x).float().mean() < 0.1  # not an echo of the input
    got = ours(x)
    assert got.dtype == torch.float32  # logits in float32 whatever the parameters
    # Loose on purpose, as for Gemma 2: bf16 keeps 8 bits of mantissa and the two
    # sides round in different places (transformers applies RoPE in bf16, we in
    # float32), so where the top two logits are close the argmax may flip.
    assert (got.argmax(-1) == ref).float().mean() >= 0.9


@torch.no_grad()
def test_in_bf16_the_embedding_scale_and_the_norm_round_exactly_as_transformers():
    # As in test_gemma2.py: no layers, D = 3072, so the bf16 rounding of sqrt(D)
    # (55.4256 -> 55.5) and the float32 (1 + w) of the final norm are checked bit for bit.
    fields = dict(TINY, vocab_size=16, hidden_size=3072, num_hidden_layers=0, num_attention_heads=1, num_key_value_heads=1, layer_types=[])
    hf, ours = oracle.pair("gemma3", seed=8, dtype=torch.bfloat16, **fields)
    x = torch.arange(16)[None]
    assert torch.equal(ours.model(x), hf.model(input_ids=x).last_hidden_state)


# --- config ----------------------------------------------------------------------

# The config.json files of the released models as the Hub holds them (the
# transformers 4.50 era): gemma3_text files for the 270M and 1B, and for the
# 4B, 12B and 27B the text_config of the multimodal file, which lists only the
# fields that differ from transformers' Gemma3TextConfig defaults.
HUB_GEMMA_3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "use_cache": True,
    "vocab_size": 262144,
}
HUB_GEMMA_3_270M = HUB_GEMMA_3_1B | {
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "_sliding_window_pattern": 6,
    "use_bidirectional_attention": False,
}
del HUB_GEMMA_3_270M["sliding_window_pattern"]
LINEAR_8 = {"factor": 8.0, "rope_type": "linear"}
HUB_TEXT_CONFIG = {
    "gemma-3-4b": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34, "rope_scaling": LINEAR_8, "sliding_window": 1024},
    "gemma-3-12b": {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text", "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8, "rope_scaling": LINEAR_8, "sliding_window": 1024},
    "gemma-3-27b": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text", "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16, "query_pre_attn_scalar": 168, "rope_scaling": LINEAR_8, "sliding_window": 1024},
}
HUB = {"gemma-3-270m": HUB_GEMMA_3_270M, "gemma-3-1b": HUB_GEMMA_3_1B} | HUB_TEXT_CONFIG


@pytest.mark.parametrize("preset", HUB.keys())
def test_presets_equal_the_released_config_files(preset):
    assert Gemma3TextConfig.from_hf(HUB[preset]) == CONFIGS[preset]


@pytest.mark.parametrize("preset", HUB.keys())
def test_transformers_reads_the_released_config_files_as_our_presets(preset):
    # The same files through transformers, then written back in its 5.x layout
    # (rope_parameters per layer type, layer_types) and read by us.
    fields = {k: v for k, v in HUB[preset].items() if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
    written = oracle.hf_config("gemma3", **fields).to_dict()
    assert "rope_parameters" in written and "layer_types" in written
    assert Gemma3TextConfig.from_hf(written) == CONFIGS[preset]


OTHER_FORMS = {
    # transformers 4.5x: rope_parameters without rope_theta, the bases at the top level.
    "rope_parameters_without_bases": {
        "rope_scaling": None,
        "rope_theta": 1_000_000,
        "rope_local_base_freq": 10_000,
        "rope_parameters": {"full_attention": {"factor": 8.0, "rope_type": "linear"}, "sliding_attention": {"rope_type": "default"}},
    },
    # Older rope_scaling dicts say "type", not "rope_type".
    "rope_scaling_with_type": {"rope_scaling": {"factor": 8.0, "type": "linear"}},
}


@pytest.mark.parametrize("form", OTHER_FORMS.values(), ids=OTHER_FORMS.keys())
def test_from_hf_reads_the_other_rope_forms_found_in_config_files(form):
    assert Gemma3TextConfig.from_hf(HUB_TEXT_CONFIG["gemma-3-27b"] | form) == CONFIGS["gemma-3-27b"]


def test_our_defaults_are_transformers_gemma3_text_config_defaults():
    # What the multimodal files leave out must read as transformers reads it.
    assert Gemma3TextConfig.from_hf(oracle.hf_config("gemma3").to_dict()) == Gemma3TextConfig()


@pytest.mark.parametrize(
    "preset, window, scaling, vocab",
    [("gemma-3-270m", 512, None, 262144), ("gemma-3-1b", 512, None, 262144), ("gemma-3-4b", 1024, 8.0, 262208), ("gemma-3-12b", 1024, 8.0, 262208), ("gemma-3-27b", 1024, 8.0, 262208)],
)
def test_presets_have_the_released_window_rope_bases_scaling_and_pattern(preset, window, scaling, vocab):
    c = CONFIGS[preset]
    assert (c.sliding_window, c.rope_local_base_freq, c.rope_theta, c.vocab_size) == (window, 10_000.0, 1_000_000.0, vocab)
    assert (c.rope_scaling or {}).get("factor") == scaling
    assert c.layer_types == ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(c.num_hidden_layers)]


def test_27b_scales_queries_by_168_not_by_its_head_dim_128():
    c = CONFIGS["gemma-3-27b"]
    assert (c.query_pre_attn_scalar, c.head_dim, c.hidden_size // c.num_attention_heads) == (168, 128, 168)


@pytest.mark.parametrize("preset", CONFIGS.keys())
def test_preset_parameter_count_and_names_equal_transformers(preset):
    config = CONFIGS[preset]
    with torch.device("meta"):  # shapes only, no memory
        ours = Gemma3ForCausalLM(config)
        hf = oracle.HF_CAUSAL_LM["gemma3"](oracle.hf_config("gemma3", **dataclasses.asdict(config)))
    n = sum(p.numel() for p in ours.parameters())  # the tied embedding once
    assert n == sum(p.numel() for p in hf.parameters())
    hf_shapes = {k: v.shape for k, v in oracle.our_state_dict(hf).items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == hf_shapes


# Gemma 3 report (arXiv 2503.19786) Table 1, non-embedding parameters in
# millions (the 270M came later and is not in it). The table's embedding
# column (302M, 675M, 1,012M, 1,416M) matches vocab x hidden for the 1B only.
REPORT_NON_EMBEDDING_M = {"gemma-3-1b": 698, "gemma-3-4b": 3209, "gemma-3-12b": 10759, "gemma-3-27b": 25600}


@pytest.mark.parametrize("preset", REPORT_NON_EMBEDDING_M.keys())
def test_preset_non_embedding_parameters_equal_the_reports_table_1(preset):
    with torch.device("meta"):
        model = Gemma3ForCausalLM(CONFIGS[preset])
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    assert round(n / 1e6) == REPORT_NON_EMBEDDING_M[preset]


def test_state_dict_holds_exactly_the_transformers_names_less_the_tied_lm_head():
    hf = oracle.hf_causal_lm("gemma3", **TINY)
    ours = Gemma3ForCausalLM(Gemma3TextConfig(**TINY))
    assert set(ours.state_dict()) == set(hf.state_dict()) - {"lm_head.weight"}
    assert "model.layers.0.self_attn.q_norm.weight" in ours.state_dict()


REFUSED = {
    "attention_soft_cap": dict(attn_logit_softcapping=50.0),
    "final_soft_cap": dict(final_logit_softcapping=30.0),
    "bidirectional_embedding_model": dict(use_bidirectional_attention=True),
    "yarn_scaling": dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}),
    "rope_parameters_not_an_object": dict(rope_parameters="linear"),
    "scaled_local_layers": dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 8.0}}),
    "scaling_factor_as_text": dict(rope_scaling={"rope_type": "linear", "factor": "8"}),
    "scaling_factor_zero": dict(rope_scaling={"rope_type": "linear", "factor": 0}),
    "pattern_zero": dict(sliding_window_pattern=0),
    "window_zero": dict(sliding_window=0),
    "layer_types_too_short": dict(layer_types=["sliding_attention"] * 5),
    "local_base_negative": dict(rope_local_base_freq=-10_000),
}


@pytest.mark.parametrize("fields", REFUSED.values(), ids=REFUSED.keys())
def test_from_hf_refuses_what_gemma_3_does_not_compute_with_a_value_error_naming_the_field(fields):
    with pytest.raises(ValueError, match="|".join(fields)):
        Gemma3TextConfig.from_hf(HUB_GEMMA_3_1B | fields)


# --- what the ring buffer saves --------------------------------------------------


def cache_mib(config, length):
    """MiB of the bf16 KV cache that make_cache allocates for one sequence of `length`."""
    with torch.device("meta"):  # shapes only, no memory
        model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    cache = model.make_cache(1, length)
    return sum(c.k.nbytes + c.v.nbytes for c in cache) / 2**20


@pytest.mark.parametrize(
    "preset, length, ring, full",
    [
        ("gemma-3-1b", 8192, 43, 208),
        ("gemma-3-1b", 32768, 139, 832),  # the worked example of RingKVCache's docstring
        ("gemma-3-27b", 8192, 1056, 3968),
        ("gemma-3-27b", 32768, 2976, 15872),
    ],
)
def test_ring_buffers_on_local_layers_shrink_the_bf16_kv_cache_as_the_readme_says(preset, length, ring, full):
    config = CONFIGS[preset]
    assert round(cache_mib(config, length)) == ring
    # A window as long as the sequence: every layer keeps every key, as in gemma2.py.
    assert round(cache_mib(dataclasses.replace(config, sliding_window=length), length)) == full


# --- torch.compile ---------------------------------------------------------------


@pytest.mark.slow
def test_compiled_generate_through_the_ring_gives_the_eager_tokens(gen_pair):
    # The decode step compiles with static shapes: the ring has a fixed size.
    _, ours = gen_pair
    prompts = [[2, 17, 99, 3, 54, 200, 7, 11, 150, 42, 8, 61], [2, 5, 250, 33]]  # left padding, prompts > W
    eager = generate(ours, prompts, 12)
    assert generate(ours, prompts, 12, compile=True) == eager
    assert len(set(eager[0] + eager[1])) > 3


def test_from_hf_rejects_an_activation_that_is_not_the_tanh_gelu():
    with pytest.raises(ValueError, match="silu"):
        Gemma3TextConfig.from_hf(HUB_GEMMA_3_1B | {"hidden_activation": "silu"})


# --- diff gemma2.py gemma3.py is the list of changes -------------------------------

# Each Gemma 3 change, with the words that name it in the code (as tests/test_diff.py
# does for Gemma 1 -> 2): a hunk of the diff that names none of them and is no
# rename is a change the module docstring and the README do not list.
GEMMA3_CHANGES = {
    "QK-norm replaces the attention soft-cap": r"q_norm|k_norm|QK-norm|softcap|soft-cap",
    "five local layers per global one, shorter window": r"sliding|window|local|global|layer_types|\bmasks?\b|% 6|% n\b",
    "two RoPE bases, linear scaling on global layers": r"rope|RoPE|factor|angles",
    "ring-buffer cache for local layers": r"[Rr]ing|key_slots|KVCache|make_cache|zeros",
    "vocabulary and presets": r"vocab_size|CONFIGS|gemma-3-|config\.json|max_position_embeddings|eos_token_id",
    "text only: no classifier heads": r"[Cc]lassifi|ForSequenceClassification|ForTokenClassification|score",
}
RENAMED = r"\bGemma[23](Text)?(Config|Attention|MLP|DecoderLayer|Model|ForCausalLM)\b"


def diff_hunks():
    """(lines of gemma2.py, lines of gemma3.py) of each hunk below the module docstrings."""
    import difflib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    old, new = ((root / f).read_text().splitlines() for f in ("gemma2.py", "gemma3.py"))
    start = lambda lines: lines.index("import math")  # noqa: E731
    for tag, a, b, c, d in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag != "equal" and (a >= start(old) or c >= start(new)):
            yield old[a:b], new[c:d]


def test_every_hunk_of_diff_gemma2_gemma3_names_a_gemma3_change_or_a_renamed_class():
    import re

    pattern = re.compile("|".join([*GEMMA3_CHANGES.values(), RENAMED]))
    unexplained = [(a, b) for a, b in diff_hunks() if not any(pattern.search(line) for line in a + b)]
    assert not unexplained, "\n---\n".join("\n".join(["< " + x for x in a] + ["> " + x for x in b]) for a, b in unexplained)
