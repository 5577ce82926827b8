"""The compiled path (generate(..., compile=True)) is the eager model, only faster.

torch.compile traces the same forward and fuses its operations, so the logits
differ from eager ones by float32 rounding (about 1e-6), far less than the
gap between the two best tokens of these random models: greedy decoding
must give the very same tokens. The models are tiny because what is
tested is the compiled path (prefill with dynamic shapes, the one-token decode
step, left padding), not the arithmetic of a large model; compiling still
takes tens of seconds on a CPU, hence "slow".
"""

import pytest
import torch
from torch._dynamo.utils import counters

import gemma
import gemma2

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, head_dim=16, max_position_embeddings=512)
MODELS = {
    "gemma": lambda: gemma.GemmaForCausalLM(gemma.GemmaConfig(**SHAPE, num_key_value_heads=1)),
    # A window shorter than the prompts, so that the sliding-window mask matters.
    "gemma2": lambda: gemma2.Gemma2ForCausalLM(
        gemma2.Gemma2Config(**SHAPE, num_key_value_heads=2, query_pre_attn_scalar=16, sliding_window=8)
    ),
}
FAMILY = {"gemma": gemma, "gemma2": gemma2}


def random_model(name):
    """Every parameter random, norm weights included (zeros would hide a (1 + w) bug).

    Small embeddings and strong layers: with the tied head, a large embedding
    makes greedy decoding repeat the last token whatever the layers compute.
    These weights give varied tokens whose two best logits differ by more than
    0.01, four orders of magnitude above the rounding differences.
    """
    model = MODELS[name]().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            std = 0.05 if "embed_tokens" in pname else 2 * p.shape[-1] ** -0.5 if p.dim() == 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_compiled_generate_gives_the_eager_tokens(name):
    model, family = random_model(name), FAMILY[name]
    prompts = [[2, 17, 99, 3, 54, 200, 7, 11, 150, 42, 8, 61], [2, 5, 250, 33]]  # left padding in the batch
    eager = family.generate(model, prompts, 12)
    compiled = family.generate(model, prompts, 12, compile=True)
    assert compiled == eager
    assert len(set(eager[0] + eager[1])) > 3  # the models do not just repeat one token


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_a_second_compiled_generate_of_similar_length_compiles_nothing(name):
    model, family = random_model(name), FAMILY[name]
    family.generate(model, [[2, 9, 4, 77, 13], [2, 8]], 12, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    # Other prompt lengths, more new tokens and another model object (with the
    # same weights): the cache size is rounded up, so both compiled graphs, the
    # prefill (dynamic shapes) and the decode step, are found again.
    prompts = [[2, 31, 8], [2, 40, 41, 42, 43, 44, 45]]
    second = family.generate(random_model(name), prompts, 20, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert second == family.generate(model, prompts, 20)
