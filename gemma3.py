"""Gemma 3 (text) in one file: config, model, KV cache and generation.

Gemma 3 Technical Report, arXiv 2503.19786, after Gemma 2: Improving Open
Language Models at a Practical Size, arXiv 2408.00118, and Gemma, arXiv 2403.08295.
Building blocks: RoPE (RoFormer, arXiv 2104.09864), multi-query and grouped-query
attention (arXiv 1911.02150, 2305.13245), GeGLU (arXiv 2002.05202), RMSNorm
(arXiv 1910.07467). Parameter names equal the Hugging Face state-dict names,
so a `transformers` checkpoint loads without renaming (see weights.py).

What differs from Gemma 2 (`diff gemma2.py gemma3.py` shows exactly this; sec. 2):
  - QK-norm: an RMSNorm over head_dim on queries and keys, in place of the
    attention soft-cap; no final soft-cap either;
  - five local layers for every global one (layer i global when (i + 1) % 6
    == 0), with a window of 1024 positions (512 in the 270M and 1B configs);
  - two RoPE bases, 10k on local layers and 1M on global ones, and in the 4B,
    12B and 27B the global positions scaled down by 8 (positional interpolation);
  - the KV cache of a local layer holds only its window, a ring buffer: that
    saving is the reason for the two changes above (sec. 5.2);
  - a 262,144-piece vocabulary (262,208 in the multimodal checkpoints' text tower);
  - text only: no vision tower (4B, 12B, 27B), and no classifier heads.
The rest is Gemma 2's: sandwich norms, query_pre_attn_scalar (168 in the 27B),
grouped-query attention, sqrt(hidden_size) embedding scale, tied LM head, RMSNorm
with (1 + weight), GeGLU, rotate-half RoPE, head_dim apart from hidden_size.

Shape legend: B batch, T query length, S key length (cache size), D hidden,
N query heads, K key/value heads, H head_dim, F ffn, V vocab, L layers.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Gemma3TextConfig:
    # The defaults are transformers' Gemma3TextConfig defaults (a Gemma-2-2B shape,
    # not a released model), because the multimodal config.json files list only
    # the text fields that differ from them (see CONFIGS for the released values).
    vocab_size: int = 262208  # V; SentencePiece pieces (+ 64 image tokens here)
    hidden_size: int = 2304  # D; the width of the residual stream
    intermediate_size: int = 9216  # F; each of gate and up (Table 1 lists 2F)
    num_hidden_layers: int = 26  # L
    num_attention_heads: int = 8  # N
    num_key_value_heads: int = 4  # K; 1: multi-query, N: multi-head, else grouped-query
    head_dim: int = 256  # H; not hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    # Two RoPE bases: 1M on global layers for long context, 10k on local ones
    # (Gemma 3 report sec. 2, "Long context").
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # local layers
    # Global layers only: {"rope_type": "linear", "factor": 8.0} divides their
    # positions by 8 (4B, 12B, 27B; positional interpolation, arXiv 2306.15595).
    # None: unscaled (270M, 1B).
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072  # the longest sequence it was trained on
    pad_token_id: int = 0
    eos_token_id: int | list = 1  # the -it configs list <end_of_turn> (106) too
    bos_token_id: int = 2
    query_pre_attn_scalar: float = 256  # queries are scaled by its -1/2 power
    sliding_window: int = 4096  # how far back a local layer sees
    # "sliding_attention" or "full_attention" for each layer; None: five local
    # layers, then one global, as in the released models (sec. 2).
    layer_types: list | None = None

    def __post_init__(self):
        # Refuse, naming the field, a value the model cannot run with: a typo in a
        # config.json would otherwise fail deep inside torch, or give NaN logits.
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("token_id"):  # None, an id, or a list of ids
                ids = [] if v is None else v if type(v) is list else [v]
                ok, want = all(type(i) is int and 0 <= i < self.vocab_size for i in ids), "None or ids < vocab_size"
            elif f.type is int:  # a count or a width (no layers: embedding and head only)
                least = 0 if f.name == "num_hidden_layers" else 1
                ok, want = type(v) is int and v >= least, f"an integer >= {least}"
            elif f.type in (float, float | None):  # eps, theta, a scale; a cap may be None
                ok = (v is None and f.type is not float) or (type(v) in (int, float) and 0 < v < math.inf)
                want = "a finite number > 0"
            else:
                continue
            if not ok:
                raise ValueError(f"config field {f.name} = {v!r:.80}: must be {want}")
        N, K, H = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        if N % K or H % 2:  # each key/value head serves N / K query heads; RoPE rotates pairs
            raise ValueError(f"config fields num_attention_heads = {N}, num_key_value_heads = {K}, head_dim = {H}: K must divide N, and H be even")
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(self.num_hidden_layers)]
        kinds = ("sliding_attention", "full_attention")
        if type(self.layer_types) is not list or len(self.layer_types) != self.num_hidden_layers or not all(t in kinds for t in self.layer_types):
            raise ValueError(f"config field layer_types = {self.layer_types!r:.80}: must be a list of {self.num_hidden_layers} of {kinds}")
        # Linear scaling only, by a finite factor > 0 (the 4B, 12B and 27B use 8).
        r = self.rope_scaling
        if r is not None and not (type(r) is dict and r.get("rope_type") == "linear" and type(r.get("factor")) in (int, float) and 0 < r["factor"] < math.inf):
            raise ValueError(f"config field rope_scaling = {r!r:.80}: must be None or {{'rope_type': 'linear', 'factor': a number > 0}}")

    @classmethod
    def from_hf(cls, d):
        """The config from a parsed gemma3_text config.json (every layout)."""
        d = dict(d)
        # transformers 5 writes one rope_parameters entry per layer type; the Hub
        # files of the released models have rope_theta, rope_local_base_freq and
        # rope_scaling (the global layers' scaling) at the top level.
        rope = d.get("rope_parameters") or {}
        full, local = (rope.get("full_attention") or {}, rope.get("sliding_attention") or {}) if type(rope) is dict else (None, None)
        if type(full) is not dict or type(local) is not dict or local.get("rope_type", "default") != "default":
            raise ValueError(f"config field rope_parameters = {rope!r:.80}: must give the local layers the default RoPE")
        if rope:
            # An entry without rope_theta keeps the top-level value, as in transformers.
            d["rope_theta"] = full.get("rope_theta", d.get("rope_theta", cls.rope_theta))
            d["rope_local_base_freq"] = local.get("rope_theta", d.get("rope_local_base_freq", cls.rope_local_base_freq))
            d["rope_scaling"] = full
        scaling = d.get("rope_scaling")
        if type(scaling) is dict:  # older files say "type"; "default" means unscaled
            kind = scaling.get("rope_type", scaling.get("type"))
            d["rope_scaling"] = None if kind == "default" else {"rope_type": kind, "factor": scaling.get("factor")}
        # Older files give the pattern as a number n: every n-th layer is global.
        n, L = d.get("sliding_window_pattern"), d.get("num_hidden_layers", cls.num_hidden_layers)
        if d.get("layer_types") is None and n is not None:
            if type(n) is not int or n < 1:
                raise ValueError(f"config field sliding_window_pattern = {n!r:.80}: must be an integer >= 1")
            if type(L) is int:  # else __post_init__ names num_hidden_layers
                d["layer_types"] = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(L)]
        # transformers keeps the Gemma 2 soft-cap fields (null in every release) and
        # an embedding-model switch; neither is Gemma 3's decoder.
        for key in ("attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention"):
            if d.get(key):
                raise ValueError(f"config field {key} = {d[key]!r:.80}: Gemma 3 has no soft-cap and attends causally")
        # The Hub files say "hidden_act": "gelu", which transformers reads as the
        # tanh approximation, the activation Gemma was trained with (HF PR #29402).
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {act!r}: Gemma uses the tanh GELU")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# The config.json files of the released models on the Hugging Face Hub
# (google/gemma-3-1b-pt, ...; for 4B, 12B, 27B the text_config of the multimodal
# checkpoint); the report's Table 1 gives their parameter counts.
CONFIGS = {
    "gemma-3-270m": Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                                     num_key_value_heads=1, max_position_embeddings=32768, sliding_window=512),
    "gemma-3-1b": Gemma3TextConfig(vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                                   num_key_value_heads=1, max_position_embeddings=32768, sliding_window=512),
    # The text towers of the multimodal checkpoints: global positions scaled by 8.
    "gemma-3-4b": Gemma3TextConfig(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                                   sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "gemma-3-12b": Gemma3TextConfig(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
                                    sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    # query_pre_attn_scalar = hidden_size / num_attention_heads = 168, not head_dim = 128,
    # as in Gemma 2 27B (the Hub config.json).
    "gemma-3-27b": Gemma3TextConfig(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
                                    head_dim=128, query_pre_attn_scalar=168, sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}),
}


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w) (arXiv 1910.07467), with the gain stored as 1 + w.

    The (1 + w) is the released code's, not the papers': w = 0 is the identity, so
    a zero-initialised gain starts neutral (and decays towards 1, not towards 0).
    """

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        # In float32, and the weight applied as (1 + w) in float32 before the cast
        # back: casting first and then multiplying changes bf16 results
        # (HF PR #29402, gemma_pytorch PR #67).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


def rope(x, cos, sin):
    """Rotate each channel pair (i, i + H/2) of x by its angle, in float32 (RoPE).

    RoFormer (arXiv 2104.09864, eq. 34) rotates adjacent pairs (2i, 2i + 1); this
    "rotate half" layout pairs channel i with i + H/2. It is the same rotation
    with the channels permuted, and Gemma was trained in this layout (HF and the
    official gemma_pytorch alike), so q/k weights load with no permutation.
    x (B, N, T, H); cos, sin (B, 1, T, H/2).
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, N, T, H/2) each
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, N, T, H)
    return out.to(x.dtype)


def rope_angles(positions, head_dim, theta, factor=1.0):
    """cos and sin of (position / factor) * theta^(-2i/H) for i < H/2, in float32.

    Written 1 / theta^(2i/H), as transformers computes it: theta^(-2i/H) differs
    in the last bit, and at position 8191 that bit moves the logits by 1e-5.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)  # (H/2,)
    # Linear scaling (positional interpolation, arXiv 2306.15595): with factor 8 a
    # global layer turns position p as it would turn p / 8 (Gemma 3 report sec. 2).
    inv_freq = inv_freq / factor
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, H/2)
    return angles.cos(), angles.sin()


def attention_mask(query_slots, key_slots, pad, window=None):
    """Which keys each query may see: (B, 1, T, S) booleans, True = visible.

    Query t sits in cache slot i = query_slots[t]; it sees the slots j <= i, except
    the left padding of its row (slots j < pad[b]). For a prompt "a b c" after two
    pads (pad = 2), "x" = visible:

        slot   0 1 2 3 4
        pad    . . . . .
        pad    . . . . .
        a      . . x . .
        b      . . x x .
        c      . . x x x

    With a window W (local layers), it sees only the last W slots, i - W < j <= i
    (HF #31781 is this bound off by one). Global and local with W = 3, no padding:

        key    0 1 2 3 4 5          key    0 1 2 3 4 5
        q 0    x . . . . .          q 0    x . . . . .
        q 1    x x . . . .          q 1    x x . . . .
        q 2    x x x . . .          q 2    x x x . . .
        q 3    x x x x . .          q 3    . x x x . .
        q 4    x x x x x .          q 4    . . x x x .
        q 5    x x x x x x          q 5    . . . x x x

    Key s comes from slot key_slots[s], in any order: a full cache returns slots
    0 .. S-1, a ring buffer its window and then the new keys (see RingKVCache),
    with -1 for an empty slot, which is hidden as padding is.
    """
    i = query_slots[:, None]  # (T, 1)
    j = key_slots[None, :]  # (1, S)
    visible = j <= i  # (T, S)
    if window is not None:
        visible = visible & (j > i - window)
    not_pad = j >= pad[:, None]  # (B, S)
    return (visible[None, :, :] & not_pad[:, None, :])[:, None]  # (B, 1, T, S)


class KVCache(nn.Module):
    """Keys and values of one global layer for every slot of the sequence, preallocated.

    Sized once to prompt + new tokens, written in place: no reallocation while
    decoding, and fixed shapes, which torch.compile and CUDA graphs need. Its
    size: 2 (keys, values) x B x K x S x H x bytes per value, for each global
    layer; the local layers' caches are rings (RingKVCache). The compiled path
    rounds S up to 256 slots (see stream).
    """

    def __init__(self, k, v):
        super().__init__()
        self.register_buffer("k", k, persistent=False)  # (B, K, S, H)
        self.register_buffer("v", v, persistent=False)  # (B, K, S, H)

    def key_slots(self, slots):
        """The slot of each key that update returns: all of them, in order."""
        return torch.arange(self.k.shape[2], device=slots.device)  # (S,)

    def update(self, slots, k, v):
        self.k[:, :, slots] = k  # k, v (B, K, T, H) into slots (T,)
        self.v[:, :, slots] = v
        return self.k, self.v  # (B, K, S, H)

    def prefix(self, length):
        """The first `length` slots, sharing this cache's memory (see stream)."""
        return KVCache(self.k[:, :, :length], self.v[:, :, :length])


class RingKVCache(nn.Module):
    """Keys and values of one local layer for its last W slots only: a ring buffer.

    A local layer never looks further back than the window W, so its cache needs
    W entries, not one per position: slot s lives at entry s % W, and each new
    key overwrites the one W slots older (Gemma 3 report sec. 5.2: the 5:1 ratio
    and the short window are there to shrink the KV cache). Per token and layer a
    cache holds 2 * K * H values (a key and a value per kv head); for S tokens

        full cache on every layer:  2 * K * H * S * L
        ring on the local layers:   2 * K * H * (S * L_global + min(S, W) * L_local)

    gemma-3-1b (L = 26: 4 global, 22 local; K = 1, H = 256, W = 512) at S = 32768
    in bf16: 1 KiB per token and layer, so 26 * 32768 KiB = 832 MiB for a full
    cache against (4 * 32768 + 22 * 512) KiB = 139 MiB with rings, 6x less.

    W = 4, slots 0 .. 5 written, decoding slot 6:

        entry        0  1  2  3
        slot held    4  5  2  3     keys: slots 4 5 2 3 and the new 6; the window
                                    of slot 6 is 3 .. 6, so the mask hides slot 2,
                                    and 6 then overwrites it at entry 6 % 4 = 2.

    update returns the ring as it was plus the T new keys, then keeps the last W
    of those: a chunk of T tokens (T may exceed W) needs the W - 1 keys before
    it and itself, which is among them, and the mask, built from the slot of
    each key (key_slots), hides the rest. The ring has a fixed size, so decode
    keeps static shapes for torch.compile. (make_cache sizes it to the whole
    sequence instead when that is shorter than the window.)
    """

    def __init__(self, k, v):
        super().__init__()
        self.register_buffer("k", k, persistent=False)  # (B, K, W, H)
        self.register_buffer("v", v, persistent=False)  # (B, K, W, H)
        # The slot held by each entry; -1: empty, which the mask treats as padding.
        self.register_buffer("slots", torch.full(k.shape[2:3], -1, device=k.device), persistent=False)  # (W,)

    def key_slots(self, slots):
        """The slot of each key that update returns: the ring's, then the new ones."""
        return torch.cat([self.slots, slots])  # (W + T,)

    def update(self, slots, k, v):
        W = self.slots.shape[0]
        keys = torch.cat([self.k, k], dim=2)  # (B, K, W + T, H)
        values = torch.cat([self.v, v], dim=2)  # (B, K, W + T, H)
        keep = slots[-W:]  # the last W new slots (all of them when T <= W)
        self.k[:, :, keep % W] = k[:, :, -W:]  # k, v (B, K, T, H)
        self.v[:, :, keep % W] = v[:, :, -W:]
        self.slots[keep % W] = keep
        return keys, values

    def prefix(self, length):
        """Itself: a ring holds nothing past the chunk being prefilled (see stream)."""
        return self


class Gemma3Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, N, K, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = N, K, H
        self.scale = config.query_pre_attn_scalar**-0.5
        self.q_proj = nn.Linear(D, N * H, bias=False)
        self.k_proj = nn.Linear(D, K * H, bias=False)
        self.v_proj = nn.Linear(D, K * H, bias=False)
        self.o_proj = nn.Linear(N * H, D, bias=False)
        # QK-norm: an RMSNorm over head_dim on each query and key head, in place of
        # the attention soft-cap (Gemma 3 report sec. 2).
        self.q_norm = RMSNorm(H, config.rms_norm_eps)
        self.k_norm = RMSNorm(H, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, slots, cache=None):
        B, T, _ = x.shape
        N, K, H = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, N, H).transpose(1, 2)  # (B, N, T, H)
        k = self.k_proj(x).view(B, T, K, H).transpose(1, 2)  # (B, K, T, H)
        v = self.v_proj(x).view(B, T, K, H).transpose(1, 2)  # (B, K, T, H)
        q, k = self.q_norm(q), self.k_norm(k)  # before RoPE, as in transformers
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(slots, k, v)  # (B, K, S, H)
        # Multi-query / grouped-query attention (arXiv 1911.02150, 2305.13245): query
        # heads k*G ... k*G + G-1 share key/value head k. Stacked along T, those G
        # heads take one matmul that reads head k's keys in place, never copied.
        G = N // K
        q = q.reshape(B, K, G * T, H)  # (B, K, G*T, H)
        scores = (q @ k.transpose(2, 3)).float() * self.scale  # (B, K, G*T, S)
        scores = scores.view(B, K, G, T, -1)  # (B, K, G, T, S)
        # The most negative float rather than -inf: a query that sees nothing (a
        # left-padding slot) then averages instead of producing NaN.
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)  # mask (B, 1, 1, T, S)
        # Softmax in float32, then back to the activation dtype, as in HF eager.
        probs = scores.softmax(dim=-1).to(q.dtype).view(B, K, G * T, -1)  # (B, K, G*T, S)
        out = (probs @ v).view(B, N, T, H).transpose(1, 2).reshape(B, T, N * H)  # (B, T, N*H)
        return self.o_proj(out)  # (B, T, D)


class Gemma3MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        # GeGLU (arXiv 2002.05202; Gemma sec. 2) with the tanh approximation of GELU,
        # the one the checkpoints were trained with (HF PR #29402).
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Gemma3Attention(config)
        self.post_attention_layernorm = RMSNorm(D, eps)  # after attention, as named
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.mlp = Gemma3MLP(config)
        self.post_feedforward_layernorm = RMSNorm(D, eps)

    def forward(self, x, cos, sin, mask, slots, cache=None):
        # "Sandwich" norms: each sub-block's output is normalised too before it joins
        # the residual stream (Gemma 2 sec. 2, to stabilise training).
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, cache))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x


class Gemma3TextModel(nn.Module):
    """The body: token ids (B, T) to final normed hidden states (B, T, D)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, tokens, slots=None, cache=None, pad=None):
        """tokens (B, T). Without a cache, a plain causal forward over T tokens.

        With `cache` (make_cache: a KVCache per global layer, a RingKVCache per
        local one), `slots` (T,) are the cache slots the tokens fill, and `pad` (B,)
        counts the left-padding slots of each row, which no query sees and which
        shift that row's RoPE positions.
        """
        B, T = tokens.shape
        if slots is None:
            slots = torch.arange(T, device=tokens.device)
        if pad is None:
            pad = torch.zeros(B, dtype=torch.long, device=tokens.device)
        c = self.config
        masks = {}
        for kind in set(c.layer_types):
            # The slots of the keys this layer type attends over: the tokens
            # themselves without a cache, else what its cache returns (every slot
            # of a full cache; the window and the new slots of a ring).
            key_slots = slots if cache is None else cache[c.layer_types.index(kind)].key_slots(slots)
            window = c.sliding_window if kind == "sliding_attention" else None
            masks[kind] = attention_mask(slots, key_slots, pad, window)  # (B, 1, T, S)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        # Two RoPE bases, and the linear scaling on global layers only (Gemma 3
        # report sec. 2, "Long context").
        factor = c.rope_scaling["factor"] if c.rope_scaling else 1.0
        angles = {
            "full_attention": rope_angles(positions, c.head_dim, c.rope_theta, factor),
            "sliding_attention": rope_angles(positions, c.head_dim, c.rope_local_base_freq),
        }

        x = self.embed_tokens(tokens)  # (B, T, D)
        # Scale by sqrt(D) (the released code's, not the papers'): the rows of the
        # embedding, which is also the LM head, are small, and the scale lifts them to
        # the residual stream's size. The scalar is cast to the activation dtype
        # first, as in the reference: in bf16 it keeps 8 bits (HF PR #29402).
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            cos, sin = angles[c.layer_types[i]]
            mask = masks[c.layer_types[i]]  # layers 0-4 local, layer 5 global, ...
            x = layer(x, cos, sin, mask, slots, cache[i] if cache is not None else None)
        return self.norm(x)  # (B, T, D)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Gemma3TextModel(config)

    def forward(self, tokens, slots=None, cache=None, pad=None):
        return self.logits(self.model(tokens, slots, cache, pad))  # (B, T, V)

    def logits(self, x):
        # The LM head is the embedding matrix (tied, Gemma sec. 2): a separate head
        # would add vocab x hidden parameters, 0.5B of gemma-2b's 2.5B.
        # No final soft-cap in Gemma 3 (report sec. 2).
        return F.linear(x, self.model.embed_tokens.weight).float()  # (..., V)

    def make_cache(self, batch, length):
        """One preallocated cache per layer, in the dtype and device of the model:
        a KVCache of `length` slots per global layer, a RingKVCache of the window
        (or `length`, when shorter) per local one."""
        c, w = self.config, self.model.embed_tokens.weight
        zeros = lambda n: torch.zeros(batch, c.num_key_value_heads, n, c.head_dim, dtype=w.dtype, device=w.device)  # noqa: E731
        W = min(c.sliding_window, length)
        return nn.ModuleList(
            KVCache(zeros(length), zeros(length)) if kind == "full_attention" else RingKVCache(zeros(W), zeros(W))
            for kind in c.layer_types
        )  # (B, K, S, H) and (B, K, W, H)


def sample(logits, temperature, top_k, top_p):
    """One token per row from the last-position logits (B, V): greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        # Keep the smallest set of most likely tokens whose probability reaches top_p
        # (nucleus sampling, arXiv 1904.09751).
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)[:, 0]  # (B,)


def check_generate_args(model, tokens, max_new_tokens, temperature, top_k, top_p, stop_tokens=()):
    """(prompts as lists of ints, whether `tokens` is one prompt): a prompt is a list of
    ints (numpy ints too) or a 1-D integer tensor or array, a batch a list of them or
    2-D. Refuses, before any work, what would otherwise fail deep inside torch."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    for name, value, ok, want in [
        ("max_new_tokens", max_new_tokens, type(max_new_tokens) is int and max_new_tokens >= 0, "an integer >= 0"),
        ("temperature", temperature, number(temperature) and 0 <= temperature < math.inf, "a finite number >= 0"),
        ("top_k", top_k, top_k is None or type(top_k) is int and top_k >= 1, "None or an integer >= 1"),
        ("top_p", top_p, top_p is None or number(top_p) and 0 < top_p <= 1, "None or a number in (0, 1]"),
        ("stop_tokens", stop_tokens, isinstance(stop_tokens, (list, tuple, set)) and all(type(t) is int for t in stop_tokens), "a list or set of ints"),
    ]:
        if not ok:
            raise ValueError(f"{name} must be {want}, got {value!r:.80}")
    plain = lambda x: x.tolist() if hasattr(x, "tolist") else x  # noqa: E731  tensors, arrays, numpy ints
    tokens = plain(tokens)
    single = not isinstance(tokens, (list, tuple)) or not tokens or not isinstance(plain(tokens[0]), (list, tuple))
    prompts = [tokens] if single else [plain(p) for p in tokens]
    V, max_len = model.config.vocab_size, model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        prompts[i] = p = [plain(t) for t in p] if isinstance(p, (list, tuple)) else p
        if not isinstance(p, list) or not all(type(t) is int for t in p):
            raise ValueError(f"a prompt is a list of token ids, not {p!r:.80}: tokenize text first (Tokenizer.encode)")
        if len(p) == 0:
            raise ValueError("empty prompt: a Gemma prompt starts with at least the <bos> token")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {V})")
        if len(p) + max_new_tokens > max_len:
            raise ValueError(f"prompt of {len(p)} tokens + {max_new_tokens} new tokens is longer than the model's {max_len} positions")
    return prompts, single


# Prompt tokens per forward while prefilling (see stream): large enough that each
# chunk's matmuls run at full speed (512 took 43.5 s against 36.6 s for an
# 8000-token prompt at gemma-2b widths, one run on a CPU),
# small enough that its attention scores (B, N, chunk, S) in float32 stay a few
# hundred MB (268 MB for gemma-2b's 8 heads at S = 8192).
PREFILL_CHUNK = 1024


@torch.no_grad()
def stream(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, compile=False, prefill_chunk=PREFILL_CHUNK):
    """Yield one new token per prompt (B,) at each step; prompts is a list of lists.

    Prompts of different lengths are left-padded into one batch: every row then
    writes its n-th new token into the same cache slot, and the padding is
    masked out and shifts that row's RoPE positions (see attention_mask).
    """
    prompts, _ = check_generate_args(model, prompts, max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return
    device = model.model.embed_tokens.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([T - len(p) for p in prompts], device=device)  # (B,)
    tokens = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # (B, T)
    prefill, decode = compile_steps(model) if compile else (model.model, model)
    length = T + max_new_tokens
    if compile:
        # Compiled code is specialised to the cache size: rounded up, it serves
        # generations of similar lengths. Slots past the current one are masked.
        length = min(-(-length // 256) * 256, model.config.max_position_embeddings)
    cache = model.make_cache(B, length)

    # The prompt goes through the body in chunks that fill the cache, so the scores
    # are (B, N, chunk, S'), never (B, N, T, T), and only the last position needs
    # logits. The queries of a chunk see no slot past its end, so it gets the cache
    # up to there, S' slots; whole chunks, so that compiled code sees few shapes.
    for a in range(0, T, prefill_chunk):
        b = min(a + prefill_chunk, T)
        seen = nn.ModuleList(c.prefix(a + prefill_chunk) for c in cache)  # (B, K, S', H) each
        x = prefill(tokens[:, a:b], torch.arange(a, b, device=device), seen, pad)  # (B, b - a, D)
    token = sample(model.logits(x[:, -1]), temperature, top_k, top_p)  # (B,)
    yield token
    for slot in range(T, T + max_new_tokens - 1):
        slots = torch.tensor([slot], device=device)
        logits = decode(token[:, None], slots, cache, pad)  # (B, 1, V)
        token = sample(logits[:, -1], temperature, top_k, top_p)
        yield token


def compile_steps(model):
    """The body over a prompt chunk (prefill) and the one-token forward (decode), compiled.

    torch.compile traces the same code and fuses its small operations. Decode has
    fixed shapes, so it compiles statically and, on CUDA, into a CUDA graph that
    launches all its kernels at once; prefill lengths vary, so it is dynamic.
    """
    cuda = model.model.embed_tokens.weight.is_cuda
    prefill = torch.compile(model.model, dynamic=True)
    decode = torch.compile(model, dynamic=False, mode="reduce-overhead" if cuda else None)
    return prefill, decode


def generate(model, tokens, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_tokens=(), compile=False):
    """New tokens for one prompt (list of ints) or a batch (list of lists).

    Temperature 0 is greedy (argmax). A prompt stops after max_new_tokens or after
    one of its stop tokens, which is kept: the instruction-tuned models end a turn
    with <end_of_turn>, so pass its id with <eos>. compile=True: see compile_steps.
    """
    prompts, single = check_generate_args(model, tokens, max_new_tokens, temperature, top_k, top_p, stop_tokens)
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for step in stream(model, prompts, max_new_tokens, temperature, top_k, top_p, compile):
        for row, t in enumerate(step.tolist()):
            if not done[row]:
                out[row].append(t)
                done[row] = t in stop_tokens
        if all(done):
            break
    return out[0] if single else out
