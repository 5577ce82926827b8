"""Opt-in: our models equal transformers on the real official checkpoints.

Set GEMMA_CHECKPOINTS to a directory holding official checkpoints, each either a
Hugging Face directory (config.json + safetensors + tokenizer.model) or an
official .ckpt with its tokenizer.model beside it:

    GEMMA_CHECKPOINTS=~/weights .venv/bin/python -m pytest tests/test_official.py -v

Both models run in float32 on the CPU (or CUDA when present); the 9B needs about
40 GB of memory for the two copies, the 27B about 220 GB. Skipped, with the
reason, when the variable is unset.
"""

import os
from pathlib import Path

import pytest
import torch
import transformers

import gemma
import gemma2
import weights

ROOT = os.environ.get("GEMMA_CHECKPOINTS")
PROMPT = "The capital of France is Paris. The capital of Germany is"


def checkpoints():
    if not ROOT:
        return [pytest.param(None, marks=pytest.mark.skip(reason="GEMMA_CHECKPOINTS is not set"))]
    found = sorted(p for p in Path(ROOT).expanduser().iterdir() if (p / "config.json").is_file() or p.suffix == ".ckpt")
    if not found:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no checkpoint in {ROOT}"))]
    return [pytest.param(p, id=p.name) for p in found]


@pytest.fixture(scope="module", params=checkpoints())
def pair(request, tmp_path_factory):
    """(ours, transformers', tokenizer) for one official checkpoint, in float32."""
    path = request.param
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = weights.load(path, device=device, dtype=torch.float32)
    hf_dir = path
    if path.suffix == ".ckpt":  # transformers reads only its own layout: convert
        hf_dir = tmp_path_factory.mktemp("hf")
        weights.save_hf(ours, hf_dir, path.parent / "tokenizer.model")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    yield ours, theirs.to(device).eval(), weights.load_tokenizer(path)


def layer_outputs(model, tokens):
    """The residual stream after each decoder layer (both models name them alike)."""
    outs = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).float()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_every_layer_and_the_logits_equal_transformers_in_float32(pair):
    ours, theirs, tok = pair
    tokens = torch.tensor([tok.encode(PROMPT)], device=ours.model.embed_tokens.weight.device)
    for i, (a, b) in enumerate(zip(layer_outputs(ours, tokens), layer_outputs(theirs, tokens))):
        # float32 over thousands of dimensions: relative error ~1e-5, plus room for the
        # growth of the residual stream (its norm reaches the hundreds in late layers).
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * b.abs().max().item(), msg=lambda m: f"layer {i} differs first: {m}")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits.float(), rtol=1e-4, atol=1e-3)


def test_a_32_token_greedy_continuation_equals_transformers(pair):
    ours, theirs, tok = pair
    prompt = tok.encode(PROMPT)
    family = gemma2 if isinstance(ours, gemma2.Gemma2ForCausalLM) else gemma
    mine = family.generate(ours, prompt, max_new_tokens=32)
    device = ours.model.embed_tokens.weight.device
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt], device=device), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert mine == out[0, len(prompt):].tolist()

