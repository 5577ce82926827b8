"""transformers as the test oracle: tiny random models, built both ways, with equal weights.

transformers is a test dependency only (requirements-dev.txt); nothing in the
product imports it. Every helper here builds the HF model with eager attention,
the path that Gemma 2 needs for soft-capping (HF PR #32865) and the one whose
arithmetic our code follows op for op.
"""

import dataclasses

import torch
import transformers

import gemma
import gemma2
import gemma3

HF_CAUSAL_LM = {"gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM}
HF_SEQ_CLS = {"gemma": transformers.GemmaForSequenceClassification, "gemma2": transformers.Gemma2ForSequenceClassification}
HF_TOK_CLS = {"gemma": transformers.GemmaForTokenClassification, "gemma2": transformers.Gemma2ForTokenClassification}
HF_CONFIG = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config}
OURS = {
    "gemma": (gemma.GemmaConfig, gemma.GemmaForCausalLM, gemma.GemmaForSequenceClassification, gemma.GemmaForTokenClassification),
    "gemma2": (gemma2.Gemma2Config, gemma2.Gemma2ForCausalLM, gemma2.Gemma2ForSequenceClassification, gemma2.Gemma2ForTokenClassification),
}

# Gemma 3 (text): transformers' Gemma3ForCausalLM with a Gemma3TextConfig; no
# classifier heads in gemma3.py.
HF_CAUSAL_LM["gemma3"] = transformers.Gemma3ForCausalLM
HF_CONFIG["gemma3"] = transformers.Gemma3TextConfig
OURS["gemma3"] = (gemma3.Gemma3TextConfig, gemma3.Gemma3ForCausalLM, None, None)


def hf_config(family, **fields):
    """A transformers config of `family` ("gemma" or "gemma2"), in the layout transformers 5 writes."""
    return HF_CONFIG[family](**fields)


def randomize_(model, seed, norm_std=0.5, embed_std=0.5, gain=1.0):
    """Overwrite EVERY parameter with seeded noise, in place; returns the model.

    transformers initialises RMSNorm weights to zero, so (1 + w) is the identity
    and a missing "1 +" or a norm applied in the wrong place would go unseen;
    here each norm weight is N(0, norm_std), so (1 + w) spreads over about
    [0, 2]. Linear weights are N(0, gain / sqrt(fan_in)), which keeps every
    sub-block's output O(1) so that no layer drowns the others; embedding rows
    are N(0, embed_std), which with the tied head gives logits of O(1-10).
    Parameters are visited by name in sorted order, so the same seed gives the
    same weights to any two models with the same parameter names.
    """
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                noise = noise * norm_std
            elif "embed_tokens" in name:
                noise = noise * embed_std
            elif name.endswith(".bias"):
                noise = noise * 0.5
            else:  # a Linear (out, in) weight
                noise = noise * gain / p.shape[1] ** 0.5
            p.copy_(noise.to(p.dtype))
    return model


def hf_causal_lm(family, seed=0, dtype=torch.float32, norm_std=0.5, embed_std=0.5, gain=1.0, **fields):
    """A randomised transformers causal LM of `family` from config fields, eager attention, eval mode."""
    config = hf_config(family, **fields)
    model = HF_CAUSAL_LM[family]._from_config(config, attn_implementation="eager")
    randomize_(model, seed, norm_std, embed_std, gain)
    # lm_head is tied to the embedding: randomising the embedding set it too.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.to(dtype).eval()


def hf_classifier(family, kind, num_labels, seed=0, **fields):
    """A randomised transformers sequence ("seq") or token ("tok") classifier, eager attention."""
    config = hf_config(family, num_labels=num_labels, **fields)
    cls = {"seq": HF_SEQ_CLS, "tok": HF_TOK_CLS}[kind][family]
    return randomize_(cls._from_config(config, attn_implementation="eager"), seed).eval()


def our_config(family, hf_model_or_config):
    """Our config read from the transformers config, through the public `from_hf`."""
    config = getattr(hf_model_or_config, "config", hf_model_or_config)
    return OURS[family][0].from_hf(config.to_dict())


def our_state_dict(hf_model):
    """The HF state dict in our names: the same, less the tied `lm_head.weight`."""
    sd = dict(hf_model.state_dict())
    sd.pop("lm_head.weight", None)
    return sd


def our_causal_lm(family, hf_model):
    """Our causal LM with the config and the weights of `hf_model`, loaded strictly."""
    model = OURS[family][1](our_config(family, hf_model))
    model.load_state_dict(our_state_dict(hf_model), strict=True)
    dtype = next(hf_model.parameters()).dtype
    return model.to(dtype).eval()


def our_classifier(family, kind, hf_model):
    """Our sequence ("seq") or token ("tok") classifier with the weights of `hf_model`."""
    cls = {"seq": OURS[family][2], "tok": OURS[family][3]}[kind]
    model = cls(our_config(family, hf_model), hf_model.config.num_labels)
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.eval()


def pair(family, seed=0, dtype=torch.float32, norm_std=0.5, embed_std=0.5, gain=1.0, **fields):
    """(transformers model, our model) with the same config and the same random weights."""
    hf = hf_causal_lm(family, seed, dtype, norm_std, embed_std, gain, **fields)
    return hf, our_causal_lm(family, hf)


@torch.no_grad()
def hf_logits(hf_model, tokens):
    """HF logits for a (B, T) batch with no padding, float32."""
    return hf_model(input_ids=tokens, use_cache=False).logits.float()


@torch.no_grad()
def hf_greedy(hf_model, prompt, max_new_tokens):
    """transformers' own greedy generate for one prompt: the new tokens, as a list.

    eos_token_id is switched off so that both sides run the full length whatever
    the random model emits; min_new_tokens would do the same but by masking the
    EOS logit, which would change the argmax.
    """
    ids = torch.tensor([prompt], device=hf_model.device)
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=hf_model.config.pad_token_id,
    )
    return out[0, len(prompt):].tolist()


def with_fields(model, **fields):
    """A copy of our model, same weights, with config fields replaced."""
    other = type(model)(dataclasses.replace(model.config, **fields))
    other.load_state_dict(model.state_dict(), strict=True)
    return other.eval()
