"""A long prompt prefilled in chunks through the KV cache gives the one-shot logits.

`stream` feeds a prompt to the model PREFILL_CHUNK tokens at a time, each chunk
attending to the cache filled so far, so that no (B, N, T, T) score tensor is
ever built. That is only a change of schedule: every position must get the
logits that transformers computes for the whole sequence at once. The prompts
here run several Gemma 2 windows past the start, the batch is left-padded
(padding shifts RoPE positions and hides keys), and the chunk sizes cut the
sequence inside and across windows, including one token at a time and a
chunk longer than the prompt.
"""

import pytest
import torch
from torch import nn

import gemma
import gemma2
import hf_oracle as oracle

FAMILY = {"gemma": gemma, "gemma2": gemma2}
TINY = dict(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            head_dim=16, max_position_embeddings=128)
FIELDS = {
    "gemma": dict(TINY, num_key_value_heads=1),  # multi-query: all 4 query heads on one key/value head
    "gemma2": dict(TINY, num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=5,
                   attn_logit_softcapping=3.0, final_logit_softcapping=8.0),
}
T = 40  # 8 windows of 5
PAD = [0, 13]  # the second prompt is 27 tokens, left-padded by 13
# float32, the same operations on differently shaped matmuls: rounding only (as
# in test_gemma.py and test_gemma2.py).
ATOL = 1e-4


def padded_batch():
    """(tokens (2, T), pad (2,), HF attention mask, HF position ids) for two prompts."""
    x = torch.randint(3, TINY["vocab_size"], (len(PAD), T), generator=torch.Generator().manual_seed(1))
    pad = torch.tensor(PAD)
    visible = (torch.arange(T)[None, :] >= pad[:, None]).long()  # (B, T)
    x = x.masked_fill(visible == 0, 0)
    positions = (visible.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes
    return x, pad, visible, positions


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 16, T + 8])
@torch.no_grad()
def test_logits_of_a_chunked_prefill_equal_transformers_at_every_visible_position(family, chunk):
    hf, ours = oracle.pair(family, seed=3, **FIELDS[family])
    x, pad, visible, positions = padded_batch()
    ref = hf(input_ids=x, attention_mask=visible, position_ids=positions, use_cache=False).logits
    cache, got = ours.make_cache(len(PAD), T + 8), []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        seen = nn.ModuleList(c.prefix(a + chunk) for c in cache)  # as stream passes it
        got.append(ours(x[:, a:b], torch.arange(a, b), seen, pad))
    got = torch.cat(got, dim=1)  # (B, T, V)
    mask = visible.bool()  # padding rows carry no meaning on either side
    torch.testing.assert_close(got[mask], ref[mask], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_generated_tokens_do_not_depend_on_the_prefill_chunk(family):
    _, ours = oracle.pair(family, seed=2, embed_std=0.05, norm_std=1.5, **FIELDS[family])
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (31, 9)]
    runs = {
        chunk: [step.tolist() for step in FAMILY[family].stream(ours, prompts, 12, prefill_chunk=chunk)]
        for chunk in (1, 5, 8, 64)
    }
    assert len({str(r) for r in runs.values()}) == 1, runs
    assert len({t for step in runs[64] for t in step}) > 4  # the model does not repeat one token
