"""Gemma 1 (gemma.py) against transformers' GemmaForCausalLM, the reference implementation.

Every model here is tiny and random, built by transformers with eager attention
and then loaded into ours through `from_hf` and a strict `load_state_dict`, so
each test also checks that the two agree on config fields and parameter names.
All weights are random, norm weights included (hf_oracle.randomize_).
"""

import dataclasses

import pytest
import torch

import gemma
import hf_oracle as oracle
from gemma import CONFIGS, GemmaConfig, GemmaForCausalLM, GemmaModel, generate

# float32 parity bound on logits of O(1-10): the two sides do the same math in a
# different order (rotate_half vs chunk, repeat_kv vs repeat_interleave, matmul
# blocking), which leaves differences of about 1e-5 relative, measured 1e-5
# absolute at most on these models. 1e-4 leaves a margin of ~10x, and every
# real bug we guard against moves logits by far more (see the test on a 1%
# change of one norm weight below).
ATOL = 1e-4

# The base of every tiny config: head_dim = hidden / heads = 12, 3 layers, a
# short max_position_embeddings so that the length check of generate is cheap.
TINY = dict(
    vocab_size=256,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=64,
)

# Each variant is the smallest change of TINY that can break one piece.
VARIANTS = {
    "multi_query_1_kv_head": dict(TINY, num_key_value_heads=1),  # gemma-2b
    "grouped_query_2_kv_heads": dict(TINY, num_key_value_heads=2),
    "multi_head_4_kv_heads": dict(TINY, num_key_value_heads=4),  # gemma-7b
    # 4 heads x 16 = 64 > hidden 48, as gemma-7b's 16 x 256 = 4096 > 3072.
    "head_dim_16_not_hidden_over_heads": dict(TINY, head_dim=16),
    "odd_vocab_311": dict(TINY, vocab_size=311),
    "rope_theta_100": dict(TINY, rope_theta=100.0),  # read from rope_parameters
}

# Weights for the generation tests: with the tied LM head, a random model tends
# to predict the token it was just given, over and over. Larger Linear weights
# (gain 3) and a smaller embedding (0.3) let the layers outweigh the embedding
# in the residual stream, so the greedy continuation varies; the tests assert
# that it does.
GEN_WEIGHTS = dict(embed_std=0.3, gain=3.0)
PROMPT = [2, 17, 101, 45, 9]


def tokens(batch, length, vocab=TINY["vocab_size"], seed=0):
    """Random token ids (batch, length), the same for the same seed."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gen_pair():
    """(transformers, ours) for the generation tests, built once for this module."""
    return oracle.pair("gemma", seed=3, **GEN_WEIGHTS, **TINY)


# --- logits and hidden states ------------------------------------------------


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=VARIANTS.keys())
def test_logits_equal_transformers(fields):
    hf, ours = oracle.pair("gemma", seed=1, **fields)
    x = tokens(2, 20, fields["vocab_size"])
    ref = oracle.hf_logits(hf, x)
    # The tolerance means something only if the logits are not all tiny.
    assert ref.std() > 1.0
    torch.testing.assert_close(ours(x), ref, atol=ATOL, rtol=0)


def test_the_parity_tolerance_sees_a_one_percent_change_in_one_norm_weight():
    hf, ours = oracle.pair("gemma", seed=1, **TINY)
    x = tokens(2, 20)
    with torch.no_grad():
        ours.model.layers[0].input_layernorm.weight[0] += 0.01
    diff = (ours(x) - oracle.hf_logits(hf, x)).abs().max()
    assert diff > 10 * ATOL


def test_hidden_states_of_the_body_equal_transformers_last_hidden_state():
    hf, _ = oracle.pair("gemma", seed=2, **TINY)
    body = GemmaModel(oracle.our_config("gemma", hf))
    body.load_state_dict(hf.model.state_dict(), strict=True)
    x = tokens(2, 20)
    with torch.no_grad():
        ref = hf.model(input_ids=x, use_cache=False).last_hidden_state
        # Hidden states after the final norm are O(1) per component (the norm's
        # scale is 1 + w with w ~ N(0, 0.5)); same float32 reasoning as ATOL.
        torch.testing.assert_close(body(x), ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_in_bf16_the_embedding_scale_and_the_norm_round_exactly_as_transformers():
    # With no layers the body is embed * sqrt(D), then the final norm. At
    # D = 3072 (gemma-7b), sqrt(D) = 55.4256 must round to 55.5 in bf16 before
    # the multiply, and the norm must multiply by (1 + w) in float32 before the
    # cast back (HF PR #29402, gemma_pytorch PR #67). Both sides then do the
    # same operations in the same order, so the bits must be equal.
    fields = dict(TINY, vocab_size=16, hidden_size=3072, num_hidden_layers=0, num_attention_heads=1, num_key_value_heads=1)
    hf, ours = oracle.pair("gemma", seed=8, dtype=torch.bfloat16, **fields)
    x = torch.arange(16)[None]
    ref = hf.model(input_ids=x).last_hidden_state
    got = ours.model(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref)
    assert torch.equal(ours(x), oracle.hf_logits(hf, x))


def test_logits_are_float32_and_batch_by_time_by_vocab_even_for_bf16_parameters():
    model = GemmaForCausalLM(GemmaConfig(**TINY)).to(torch.bfloat16)
    logits = model(tokens(3, 5))
    assert logits.dtype == torch.float32
    assert logits.shape == (3, 5, TINY["vocab_size"])


# --- KV cache and generate ---------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 7], ids=["from_the_first_token", "after_a_7_token_prefill"])
@torch.no_grad()
def test_decoding_one_token_at_a_time_through_the_cache_equals_the_full_forward(prefill):
    _, ours = oracle.pair("gemma", seed=4, **TINY)
    B, T = 2, 24
    x = tokens(B, T)
    full = ours(x)  # (B, T, V)
    cache, pad = ours.make_cache(B, T), torch.zeros(B, dtype=torch.long)
    steps = [ours(x[:, :prefill], torch.arange(prefill), cache, pad)]
    for t in range(prefill, T):
        steps.append(ours(x[:, t : t + 1], torch.tensor([t]), cache, pad))
    # The same math over keys that are masked instead of absent: float32 rounding only.
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_greedy_generate_equals_transformers_greedy_generate(gen_pair):
    hf, ours = gen_pair
    expected = oracle.hf_greedy(hf, PROMPT, 24)
    # A continuation that repeats one token would pass with a broken cache.
    assert len(set(expected)) >= 12
    assert generate(ours, PROMPT, 24) == expected


def test_each_prompt_of_a_left_padded_batch_gets_the_tokens_it_gets_alone(gen_pair):
    _, ours = gen_pair
    # Different lengths force left padding; the pad id 0 also occurs inside a
    # prompt, where it must be read as a token, not as padding.
    prompts = [[2], [2, 0, 77, 31], [2, 9, 140, 8, 200, 66, 5, 13, 250]]
    alone = [generate(ours, p, 16) for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)  # three different answers
    assert all(len(set(a)) >= 6 for a in alone)
    assert generate(ours, prompts, 16) == alone


def test_generation_stops_after_a_stop_token_and_keeps_it(gen_pair):
    _, ours = gen_pair
    free = generate(ours, PROMPT, 24)
    stop = free[5]
    first = free.index(stop)  # it stops at the stop token's first appearance, at most 5
    assert generate(ours, PROMPT, 24, stop_tokens=(stop,)) == free[: first + 1]


def test_in_a_batch_only_the_prompt_that_emits_a_stop_token_stops(gen_pair):
    _, ours = gen_pair
    other = [2, 9, 140, 8]
    free = generate(ours, [PROMPT, other], 24)
    stop = next(t for t in free[0][3:] if t not in free[1])
    out = generate(ours, [PROMPT, other], 24, stop_tokens=(stop,))
    assert len(out[0]) < 24
    assert out[0] == free[0][: free[0].index(stop) + 1]
    assert out[1] == free[1]


def test_generate_returns_a_list_of_ints_for_one_prompt_and_a_list_of_lists_for_a_batch(gen_pair):
    _, ours = gen_pair
    one = generate(ours, PROMPT, 3)
    assert isinstance(one, list) and len(one) == 3 and all(isinstance(t, int) for t in one)
    batch = generate(ours, [PROMPT], 3)
    assert batch == [one]


# --- sampling ----------------------------------------------------------------


def sampled(model, seed, **kw):
    torch.manual_seed(seed)
    return generate(model, PROMPT, 16, **kw)


def first_sampled(model, seed, **kw):
    torch.manual_seed(seed)
    return generate(model, PROMPT, 1, **kw)[0]


def test_sampling_with_the_same_seed_gives_the_same_tokens_and_another_seed_others(gen_pair):
    _, ours = gen_pair
    a = sampled(ours, 1, temperature=1.5)
    assert sampled(ours, 1, temperature=1.5) == a
    # Otherwise the first assertion would also pass for a sampler that ignores
    # the randomness (greedy whatever the temperature).
    assert sampled(ours, 2, temperature=1.5) != a


def test_a_tiny_temperature_is_greedy_and_a_huge_one_samples_almost_uniformly(gen_pair):
    _, ours = gen_pair
    assert sampled(ours, 1, temperature=1e-3) == generate(ours, PROMPT, 16)
    # 60 uniform draws from 256 tokens hit about 53 different ones; at
    # temperature 1 this model's first token takes only 28 values in 60 draws.
    assert len({first_sampled(ours, seed, temperature=100.0) for seed in range(60)}) >= 40


def test_top_k_1_is_greedy_at_any_temperature(gen_pair):
    _, ours = gen_pair
    assert sampled(ours, 1, temperature=5.0, top_k=1) == generate(ours, PROMPT, 16)


def test_a_tiny_top_p_is_greedy_at_any_temperature(gen_pair):
    _, ours = gen_pair
    # Nucleus sampling keeps the smallest set whose mass reaches top_p: the top token.
    assert sampled(ours, 1, temperature=5.0, top_p=1e-6) == generate(ours, PROMPT, 16)


@torch.no_grad()
def test_top_k_samples_only_from_the_k_most_likely_tokens_and_from_each_of_them(gen_pair):
    _, ours = gen_pair
    top3 = set(ours(torch.tensor([PROMPT]))[0, -1].topk(3).indices.tolist())
    # At temperature 100 the distribution over the vocabulary is nearly flat, so
    # without top_k 60 draws would almost surely leave the top 3.
    seen = {first_sampled(ours, seed, temperature=100.0, top_k=3) for seed in range(60)}
    assert seen == top3


@torch.no_grad()
def test_top_p_samples_only_from_the_nucleus_and_from_each_of_its_tokens(gen_pair):
    _, ours = gen_pair
    logits = ours(torch.tensor([PROMPT]))[0, -1]
    probs, order = logits.softmax(-1).sort(descending=True)
    # The nucleus for top_p: tokens until the cumulative mass first reaches it.
    # Here p = 0.19, 0.16, 0.051, 0.050, ...: 1e-4 below the mass of the top
    # three, the third token is still needed to reach top_p and the fourth is
    # not; 1e-4 is far above the float32 rounding between this forward and
    # generate's cached one.
    top_p = float(probs[:3].sum()) - 1e-4
    nucleus = set(order[:3].tolist())
    seen = {first_sampled(ours, seed, temperature=1.0, top_p=top_p) for seed in range(60)}
    assert seen == nucleus


# --- bad input to generate ---------------------------------------------------

V, MAX_POS = TINY["vocab_size"], TINY["max_position_embeddings"]
BAD_INPUT = {
    "token_id_equal_to_vocab_size": (dict(tokens=[2, V]), "vocabulary"),
    "negative_token_id": (dict(tokens=[2, -1]), "vocabulary"),
    "bad_token_in_one_prompt_of_a_batch": (dict(tokens=[[2, 3], [2, V + 5]]), "vocabulary"),
    "empty_prompt_in_a_batch": (dict(tokens=[[2, 3], []]), "empty prompt"),
    "empty_prompt": (dict(tokens=[]), "empty prompt"),
    "prompt_plus_new_tokens_beyond_max_positions": (dict(tokens=[2] * 10, max_new_tokens=MAX_POS - 9), "positions"),
    "negative_max_new_tokens": (dict(max_new_tokens=-1), "max_new_tokens"),
    "bad_token_even_with_zero_new_tokens": (dict(tokens=[2, V], max_new_tokens=0), "vocabulary"),
    "negative_temperature": (dict(temperature=-0.5), "temperature"),
    "top_p_zero": (dict(temperature=1.0, top_p=0.0), "top_p"),
    "top_p_above_one": (dict(temperature=1.0, top_p=1.5), "top_p"),
}


@pytest.mark.parametrize("kwargs, message", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_generate_rejects_bad_input_with_a_value_error(kwargs, message):
    model = GemmaForCausalLM(GemmaConfig(**TINY))
    args = dict(tokens=[2, 3], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, **args)


def test_generate_accepts_a_prompt_that_exactly_fills_max_positions():
    model = GemmaForCausalLM(GemmaConfig(**TINY))
    assert len(generate(model, [2] * 10, MAX_POS - 10)) == MAX_POS - 10


# --- config ------------------------------------------------------------------

# google/gemma-2b config.json as published on the Hub (transformers 4.38 era):
# top-level rope_theta, "hidden_act": "gelu" meaning the tanh GELU.
HUB_GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "head_dim": 256,
    "hidden_act": "gelu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "max_position_embeddings": 8192,
    "model_type": "gemma",
    "num_attention_heads": 8,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0.dev0",
    "use_cache": True,
    "vocab_size": 256000,
}
# google/gemma-7b config.json (Gemma 1.1 files name the activation in both keys).
HUB_GEMMA_7B = HUB_GEMMA_2B | {
    "hidden_size": 3072,
    "intermediate_size": 24576,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "hidden_activation": "gelu_pytorch_tanh",
}


@pytest.mark.parametrize("preset", ["gemma-2b", "gemma-7b"])
def test_from_hf_reads_the_hub_layout_of_the_official_models(preset):
    hub = {"gemma-2b": HUB_GEMMA_2B, "gemma-7b": HUB_GEMMA_7B}[preset]
    assert GemmaConfig.from_hf(hub) == CONFIGS[preset]


def test_from_hf_reads_the_transformers_5_layout_with_rope_parameters():
    fields = dict(TINY, rope_theta=123.0, rms_norm_eps=1e-5, pad_token_id=5, eos_token_id=6, bos_token_id=7)
    written = oracle.hf_config("gemma", **fields).to_dict()
    assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == 123.0
    assert GemmaConfig.from_hf(written) == GemmaConfig(**fields)


def test_from_hf_ignores_unknown_keys():
    assert GemmaConfig.from_hf(HUB_GEMMA_2B | {"a_key_from_the_future": [1, 2]}) == CONFIGS["gemma-2b"]


@pytest.mark.parametrize("key, act", [("hidden_act", "silu"), ("hidden_activation", "relu"), ("hidden_act", "gelu_new")])
def test_from_hf_rejects_an_activation_that_is_not_the_tanh_gelu(key, act):
    hub = {k: v for k, v in HUB_GEMMA_2B.items() if k != "hidden_act"} | {key: act}
    with pytest.raises(ValueError, match=act):
        GemmaConfig.from_hf(hub)


def test_from_hf_rejects_rope_scaling_it_does_not_implement():
    written = oracle.hf_config("gemma", **TINY).to_dict()
    written["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="linear"):
        GemmaConfig.from_hf(written)


# --- presets and parameter names ---------------------------------------------


@pytest.mark.parametrize("preset, billions", [("gemma-2b", 2.506), ("gemma-7b", 8.538)])
def test_preset_parameter_count_matches_the_paper_and_transformers(preset, billions):
    config = CONFIGS[preset]
    with torch.device("meta"):  # shapes only, no memory
        ours = GemmaForCausalLM(config)
        hf = oracle.HF_CAUSAL_LM["gemma"](oracle.hf_config("gemma", **dataclasses.asdict(config)))
    # parameters() yields the tied embedding once, on both sides.
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e9, 3) == billions
    assert n == sum(p.numel() for p in hf.parameters())
    hf_shapes = {k: v.shape for k, v in oracle.our_state_dict(hf).items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == hf_shapes


def test_state_dict_holds_exactly_the_transformers_names_less_the_tied_lm_head():
    hf = oracle.hf_causal_lm("gemma", **TINY)
    ours = GemmaForCausalLM(GemmaConfig(**TINY))
    assert set(ours.state_dict()) == set(hf.state_dict()) - {"lm_head.weight"}
    # No buffer (RoPE table, KV cache) leaks into the checkpoint.
    assert set(ours.state_dict()) == {name for name, _ in ours.named_parameters()}


# --- classifier heads --------------------------------------------------------


def test_sequence_classifier_equals_transformers_and_pools_the_last_token_before_right_padding():
    hf = oracle.hf_classifier("gemma", "seq", num_labels=3, seed=5, **TINY)
    ours = oracle.our_classifier("gemma", "seq", hf)
    assert set(ours.state_dict()) == set(hf.state_dict())
    pad = hf.config.pad_token_id
    x = tokens(3, 12, seed=1).clamp(min=1)  # no pad id inside the text
    x[0, 7:] = pad  # right padding, 7 tokens of text
    x[1, 11:] = pad
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=(x != pad).long()).logits
        got = ours(x)
        # Pooling at a wrong position would give another row of the same
        # (B, T, labels) scores: show that those rows differ.
        assert not torch.allclose(ours.score(ours.model(x))[0, -1], got[0], atol=0.1)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)  # scores O(1-10), as logits


def test_token_classifier_equals_transformers_including_the_score_bias():
    hf = oracle.hf_classifier("gemma", "tok", num_labels=5, seed=6, **TINY)
    ours = oracle.our_classifier("gemma", "tok", hf)
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "score.bias" in ours.state_dict()
    x = tokens(2, 10, seed=2)
    with torch.no_grad():
        got = ours(x)
        assert got.shape == (2, 10, 5)
        torch.testing.assert_close(got, hf(input_ids=x).logits, atol=ATOL, rtol=0)
