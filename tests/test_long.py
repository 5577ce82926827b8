"""Long positions and heavy left padding, both families, against transformers.

The other parity tests run at positions below 100 and with a few pads, where
three classes of bug are invisible: positions that lose precision or are cut
off (only wrong past 2048 or 4096), RoPE computed in bf16 (only wrong in a bf16
model), and a mask fill value that becomes -inf in bf16 (only wrong when a
query sees nothing but padding). These tests run at the last positions a
Gemma model knows (max_position_embeddings = 8192) and with 197 pads.

Reaching position 8191 cheaply: our model's RoPE positions are `slots - pad`
(GemmaModel.forward), so a pad of -8160 puts 32 tokens at positions
8160..8191 with no padding to hide, which transformers expresses with
`position_ids`. A real 8192-token sequence also agrees with transformers
within ATOL at its last 32 positions (checked once for Gemma 2 with the
released window of 4096), but that one test took 23 s on a CPU.

Each bug below was planted, one at a time, in a scratch copy of gemma.py and
gemma2.py and this file run against it (both families each time):

  planted bug                                       caught by
  positions clamped at 4095                         float32 and bf16 tests
  positions passed through float16                  float32 and bf16 tests
  RoPE angles computed in the model's dtype (bf16)  bf16 test
  pad mask filled with float32 min cast to bf16     padding test
    (-inf; a query that sees only pads gets NaN)

With the clamp, float16 positions or bf16 angles, our bf16 error was 13 to 40
times transformers' (BF16_FACTOR is 2). The 8 tests take about 6 s on a CPU.
"""

import copy

import pytest
import torch

import hf_oracle as oracle

# head_dim 128, as gemma-2-27b: with theta 10000 the RoPE frequencies run from
# 1 to 1.2e-4 rad per position, so at position 8191 the fastest channel has
# turned 1300 times and the slowest about 1 rad; both kinds matter. Two layers,
# so that a NaN made in the first reaches the second's real rows.
BASE = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    max_position_embeddings=8192,
)
# Gemma 2: layer 0 slides over a window of 16, shorter than every sequence here.
FIELDS = {"gemma": BASE, "gemma2": dict(BASE, sliding_window=16, query_pre_attn_scalar=128)}
FAMILIES = list(FIELDS)
T = 32
LAST = 8192 - T  # the first position of the last T the model knows

# float32 parity bound, as in test_gemma.py, on logits of standard deviation
# about 5. Measured: 1e-5 at positions 8160..8191, the same as at 0..31. All of
# it comes from the inverse frequencies: ours computes theta ** (-2i/H),
# transformers 1 / theta ** (2i/H) (`_compute_default_rope_parameters` in
# transformers/models/gemma/modeling_gemma.py), which differ in the last bit;
# with transformers' formula our logits are bit-equal to its logits here.
ATOL = 1e-4

# In bf16 both implementations round at every matmul; we compare each with the
# float32 reference of the same (bf16-rounded) weights. Measured max errors,
# ours / transformers', over 8 seeded models: 0.54 to 1.01 (1.32 with
# transformers' inverse-frequency formula). Ours keeps RoPE in float32 where
# transformers rotates in bf16, so ours is not expected to be worse; 2 is a
# margin for the chance of rounding. The bugs above make ours 13x worse or more.
BF16_FACTOR = 2.0


def tokens(batch, length, seed):
    return torch.randint(0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_at(hf, x, start):
    """transformers' logits for x (B, T) at positions start .. start + T - 1."""
    positions = torch.arange(start, start + x.shape[1])[None]  # (1, T)
    return hf(input_ids=x, position_ids=positions, use_cache=False).logits.float()


@torch.no_grad()
def ours_at(model, x, start):
    """Our logits for x (B, T) at positions start .. start + T - 1 (positions = slots - pad)."""
    B, T_ = x.shape
    return model(x, torch.arange(T_), model.make_cache(B, T_), torch.full((B,), -start))


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_logits_at_positions_8160_to_8191_equal_transformers(family):
    hf, ours = oracle.pair(family, seed=1, **FIELDS[family])
    x = tokens(2, T, seed=1)
    ref = hf_at(hf, x, LAST)
    assert ref.std() > 1.0
    torch.testing.assert_close(ours_at(ours, x, LAST), ref, atol=ATOL, rtol=0)
    # The tolerance sees the bugs it is meant for, here in transformers itself:
    # positions clamped at 4095, or rounded through float16 (to multiples of 4
    # above 4096), move the logits by far more than ATOL.
    positions = torch.arange(LAST, LAST + T)[None]  # (1, T)
    for wrong in (positions.clamp(max=4095), positions.half().long()):
        with torch.no_grad():
            moved = hf(input_ids=x, position_ids=wrong, use_cache=False).logits
        assert (moved - ref).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_error_at_positions_8160_to_8191_is_no_worse_than_transformers_bf16(family, seed):
    hf, ours = oracle.pair(family, seed=seed, dtype=torch.bfloat16, **FIELDS[family])
    x = tokens(2, T, seed)
    ref = hf_at(copy.deepcopy(hf).float(), x, LAST)  # float32 math, the bf16 weights
    hf_error = (hf_at(hf, x, LAST) - ref).abs().max()
    our_error = (ours_at(ours, x, LAST) - ref).abs().max()
    assert hf_error > 0  # the bf16 models do round
    assert our_error <= BF16_FACTOR * hf_error, f"ours {our_error:.3f}, transformers {hf_error:.3f}"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_bf16_prompt_of_3_tokens_left_padded_to_200_gets_its_logits_alone(family):
    # 197 pads: the first 197 queries of row 0 see nothing at all. Their scores
    # must be filled with a finite "minus large", or softmax gives NaN, which
    # the next layer spreads to every query of the row through its values.
    _, ours = oracle.pair(family, seed=2, dtype=torch.bfloat16, **FIELDS[family])
    short, long = tokens(1, 3, seed=3), tokens(1, 200, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 197, dtype=torch.long), short], dim=1), long])  # (2, 200)
    logits = ours(batch, torch.arange(200), ours.make_cache(2, 200), torch.tensor([197, 0]))
    assert logits[0, -3:].isfinite().all() and logits[1].isfinite().all()
    # The padded batch does the same math as each prompt alone, over keys that
    # are masked instead of absent (measured: bit-equal on a CPU). 0.125 is half
    # a bf16 step between 32 and 64, where the largest logits here (about 35)
    # lie: room for kernels that block the sums differently, not for a NaN.
    torch.testing.assert_close(logits[0, -3:], ours(short)[0], atol=0.125, rtol=0)
    torch.testing.assert_close(logits[1], ours(long)[0], atol=0.125, rtol=0)

