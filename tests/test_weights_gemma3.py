"""weights.py with Gemma 3: gemma3_text directories, the text tower of multimodal
checkpoints in every key layout, and `convert` to a directory transformers loads.

Every transformers model here is tiny, with every parameter randomised (norm
and QK-norm weights included), written to tmp_path and read back through
weights.load; the logits are compared with transformers' own.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import weights
from gemma3 import Gemma3ForCausalLM, Gemma3TextConfig
from hf_oracle import hf_causal_lm, hf_logits, randomize_

# Seven layers (five local, a global one, a local one), grouped-query
# attention, head_dim 16 != hidden 32 / 4 heads, a window of 4 under 12-token
# sequences, both RoPE bases and the linear scaling.
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=7, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=64,
            query_pre_attn_scalar=24, rope_scaling={"rope_type": "linear", "factor": 8.0})
TOKENS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
# As in test_weights.py: float32 on both sides, 1-2 ulp of logits of O(10).
ATOL = 2e-5


def load(path, **kwargs):
    return weights.load(path, device="cpu", progress=False, **kwargs)


def multimodal(seed=0):
    """A tiny randomised Gemma3ForConditionalGeneration (a one-layer SigLIP tower)."""
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=TEXT, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=127, boi_token_index=125, eoi_token_index=126)
    model = transformers.Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager")
    # The text tower randomised as everywhere else; the vision tower, which text
    # logits never read, keeps transformers' initialisation.
    randomize_(model.model.language_model, seed)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied
    return model.eval()


@torch.no_grad()
def text_logits(mm):
    """transformers' logits of the multimodal model on text only."""
    return mm(input_ids=TOKENS, use_cache=False).logits.float()


def test_gemma3_text_directory_loads_as_gemma3_for_causal_lm_with_the_logits_of_transformers(tmp_path):
    hf = hf_causal_lm("gemma3", seed=1, **TEXT)
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gemma3_text"
    model = load(tmp_path / "hf")
    assert type(model) is Gemma3ForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf_logits(hf, TOKENS), atol=ATOL, rtol=0)


def save_in_layout(mm, directory, layout):
    """The multimodal checkpoint with its tensors under the names of `layout`."""
    mm.save_pretrained(directory)  # config.json, and the layout transformers 5 writes
    if layout == "save_pretrained":
        return
    state = {k: v.contiguous() for k, v in mm.state_dict().items() if k != "lm_head.weight"}  # in-memory names
    if layout == "language_model.":  # Gemma3Model's names
        state = {k.removeprefix("model."): v for k, v in state.items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


LAYOUTS = {
    "save_pretrained": "language_model.model.layers.0.self_attn.q_norm.weight",  # also the Hub files' layout
    "model.language_model.": "model.language_model.layers.0.self_attn.q_norm.weight",
    "language_model.": "language_model.layers.0.self_attn.q_norm.weight",
}


@pytest.mark.parametrize("layout", LAYOUTS.keys())
def test_multimodal_checkpoint_loads_its_text_tower_in_every_key_layout_and_says_it_skips_the_vision_tower(tmp_path, layout, capsys):
    mm = multimodal()
    save_in_layout(mm, tmp_path / "mm", layout)
    stored = weights.read_safetensors(tmp_path / "mm" / "model.safetensors")
    assert LAYOUTS[layout] in stored and any("vision_tower" in k for k in stored)
    model = weights.load(tmp_path / "mm", device="cpu")
    assert type(model) is Gemma3ForCausalLM
    message = capsys.readouterr().err
    vision = sum(1 for k in stored if "vision_tower" in k or "multi_modal_projector" in k)
    assert f"skipping the {vision} tensors of the vision tower and projector" in message
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), text_logits(mm), atol=ATOL, rtol=0)


def test_multimodal_text_config_fills_what_it_leaves_out_from_transformers_defaults(tmp_path):
    # A text_config as the Hub files have it (google/gemma-3-4b-it): only what
    # differs from transformers' Gemma3TextConfig defaults. Left out here: both
    # RoPE bases, the query scale (256, not the 24 of TEXT), layer_types, eps.
    mm = multimodal()
    mm.save_pretrained(tmp_path / "mm")
    path = tmp_path / "mm" / "config.json"
    config = json.loads(path.read_text())
    kept = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "sliding_window", "max_position_embeddings")
    config["text_config"] = {k: TEXT[k] for k in kept} | {"model_type": "gemma3_text", "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
    path.write_text(json.dumps(config))
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "mm", attn_implementation="eager").eval()
    assert hf.config.text_config.query_pre_attn_scalar == 256  # transformers' default, not TEXT's
    model = load(tmp_path / "mm")
    assert model.config == Gemma3TextConfig.from_hf(hf.config.text_config.to_dict())
    assert (model.config.rope_theta, model.config.rope_local_base_freq, model.config.query_pre_attn_scalar) == (1e6, 1e4, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), text_logits(hf), atol=ATOL, rtol=0)
        assert (model(TOKENS) - text_logits(mm)).abs().max() > 1e-2  # the defaults changed the model


def test_an_unknown_tensor_beside_the_text_tower_is_still_an_error(tmp_path):
    mm = multimodal()
    save_in_layout(mm, tmp_path / "mm", "model.language_model.")
    state = {k: v.contiguous() for k, v in mm.state_dict().items() if k != "lm_head.weight"}
    state["model.language_model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "mm" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(weights.CheckpointError, match="unexpected tensor model.layers.0.self_attn.extra.weight"):
        load(tmp_path / "mm")


@pytest.mark.parametrize("source", ["gemma3_text", "multimodal"])
def test_convert_writes_a_gemma3_text_directory_that_transformers_loads_back(tmp_path, source):
    if source == "gemma3_text":
        hf = hf_causal_lm("gemma3", seed=2, **TEXT)
        hf.save_pretrained(tmp_path / "src")
        ref = hf_logits(hf, TOKENS)
    else:
        mm = multimodal(seed=2)
        mm.save_pretrained(tmp_path / "src")
        ref = text_logits(mm)
    weights.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")])
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    back = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation="eager").eval()
    assert back.config.layer_types == Gemma3TextConfig(**TEXT).layer_types
    assert back.config.rope_parameters["full_attention"]["factor"] == 8.0
    torch.testing.assert_close(hf_logits(back, TOKENS), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(load(tmp_path / "dst")(TOKENS), ref, atol=ATOL, rtol=0)


def test_a_classifier_architecture_is_refused_for_gemma3(tmp_path):
    hf = hf_causal_lm("gemma3", **TEXT)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"architectures": ["Gemma3TextForSequenceClassification"]}))
    with pytest.raises(weights.CheckpointError, match="no ForSequenceClassification head"):
        load(tmp_path / "hf")
