"""Gemma (version 1) in one file: config, model, KV cache and generation.

Gemma: Open Models Based on Gemini Research and Technology, arXiv 2403.08295.
Building blocks: RoPE (RoFormer, arXiv 2104.09864), multi-query and grouped-query
attention (arXiv 1911.02150, 2305.13245), GeGLU (arXiv 2002.05202), RMSNorm
(arXiv 1910.07467). Parameter names equal the Hugging Face state-dict names,
so a `transformers` checkpoint loads without renaming (see weights.py).

What differs from Llama:
  - the embedding output is scaled by sqrt(hidden_size), and the LM head is the
    embedding matrix itself (tied, no lm_head weight);
  - RMSNorm multiplies by (1 + weight), so a weight of zero is the identity;
  - the MLP is GeGLU (GELU with the tanh approximation), not SwiGLU;
  - head_dim is its own setting (256), not hidden_size / num_heads: the 7B
    model has 16 heads x 256 = 4096, wider than its hidden size of 3072;
  - gemma-2b is multi-query (one key/value head), gemma-7b multi-head;
  - a 256000-token vocabulary.

Shape legend: B batch, T query length, S key length (cache size), D hidden,
N query heads, K key/value heads, H head_dim, F ffn, V vocab, L layers.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GemmaConfig:
    vocab_size: int = 256000  # V; SentencePiece pieces
    hidden_size: int = 2048  # D; the width of the residual stream
    intermediate_size: int = 16384  # F; each of gate and up (Table 1 lists 2F)
    num_hidden_layers: int = 18  # L
    num_attention_heads: int = 8  # N
    num_key_value_heads: int = 1  # K; 1: multi-query, N: multi-head, else grouped-query
    head_dim: int = 256  # H; not hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192  # the longest sequence it was trained on
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

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

    @classmethod
    def from_hf(cls, d):
        """The config from a parsed Hugging Face config.json (both layouts)."""
        d = dict(d)
        # transformers 5 nests rope_theta in rope_parameters; the Hub files of the
        # official models keep it at the top level.
        rope = d.get("rope_parameters") or {}
        if type(rope) is not dict or rope.get("rope_type", "default") != "default":
            raise ValueError(f"config field rope_parameters = {rope!r:.80}: only the default RoPE is implemented")
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        # The Hub files say "hidden_act": "gelu", which transformers reads as the
        # tanh approximation, the activation Gemma was trained with (HF PR #29402).
        act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported activation {act!r}: Gemma uses the tanh GELU")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# The config.json files of the official checkpoints on the Hugging Face Hub
# (google/gemma-2b, ...); the papers' Table 1 gives the same architecture.
CONFIGS = {
    "gemma-2b": GemmaConfig(),
    "gemma-7b": GemmaConfig(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16),
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


def rope_angles(positions, head_dim, theta):
    """cos and sin of position * theta^(-2i/H) for i < H/2, in float32.

    Written 1 / theta^(2i/H), as transformers computes it: theta^(-2i/H) differs
    in the last bit, and at position 8191 that bit moves the logits by 1e-5.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)  # (H/2,)
    angles = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, H/2)
    return angles.cos(), angles.sin()


def attention_mask(query_slots, key_len, pad):
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
    """
    i = query_slots[:, None]  # (T, 1)
    j = torch.arange(key_len, device=query_slots.device)[None, :]  # (1, S)
    visible = j <= i  # (T, S)
    not_pad = j >= pad[:, None]  # (B, S)
    return (visible[None, :, :] & not_pad[:, None, :])[:, None]  # (B, 1, T, S)


class KVCache(nn.Module):
    """Keys and values of one layer for every slot of the sequence, preallocated.

    Sized once to prompt + new tokens, written in place: no reallocation while
    decoding, and fixed shapes, which torch.compile and CUDA graphs need. Its
    size, all layers: 2 (keys, values) x L x B x K x S x H x bytes per value;
    gemma-2b in bf16: 2 x 18 x 1 x 256 x 2 bytes = 18 KiB per token, 144 MiB
    for 8192 tokens. The compiled path rounds S up to 256 slots (see stream).
    """

    def __init__(self, k, v):
        super().__init__()
        self.register_buffer("k", k, persistent=False)  # (B, K, S, H)
        self.register_buffer("v", v, persistent=False)  # (B, K, S, H)

    def update(self, slots, k, v):
        self.k[:, :, slots] = k  # k, v (B, K, T, H) into slots (T,)
        self.v[:, :, slots] = v
        return self.k, self.v  # (B, K, S, H)

    def prefix(self, length):
        """The first `length` slots, sharing this cache's memory (see stream)."""
        return KVCache(self.k[:, :, :length], self.v[:, :, :length])


class GemmaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, N, K, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = N, K, H
        self.q_proj = nn.Linear(D, N * H, bias=False)
        self.k_proj = nn.Linear(D, K * H, bias=False)
        self.v_proj = nn.Linear(D, K * H, bias=False)
        self.o_proj = nn.Linear(N * H, D, bias=False)

    def forward(self, x, cos, sin, mask, slots, cache=None):
        B, T, _ = x.shape
        N, K, H = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, N, H).transpose(1, 2)  # (B, N, T, H)
        k = self.k_proj(x).view(B, T, K, H).transpose(1, 2)  # (B, K, T, H)
        v = self.v_proj(x).view(B, T, K, H).transpose(1, 2)  # (B, K, T, H)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(slots, k, v)  # (B, K, S, H)
        # Multi-query / grouped-query attention (arXiv 1911.02150, 2305.13245): query
        # heads k*G ... k*G + G-1 share key/value head k. Stacked along T, those G
        # heads take one matmul that reads head k's keys in place, never copied.
        G = N // K
        q = q.reshape(B, K, G * T, H)  # (B, K, G*T, H)
        scores = (q @ k.transpose(2, 3)).float() * H**-0.5  # (B, K, G*T, S)
        scores = scores.view(B, K, G, T, -1)  # (B, K, G, T, S)
        # The most negative float rather than -inf: a query that sees nothing (a
        # left-padding slot) then averages instead of producing NaN.
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)  # mask (B, 1, 1, T, S)
        # Softmax in float32, then back to the activation dtype, as in HF eager.
        probs = scores.softmax(dim=-1).to(q.dtype).view(B, K, G * T, -1)  # (B, K, G*T, S)
        out = (probs @ v).view(B, N, T, H).transpose(1, 2).reshape(B, T, N * H)  # (B, T, N*H)
        return self.o_proj(out)  # (B, T, D)


class GemmaMLP(nn.Module):
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


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = GemmaAttention(config)
        # Named "post-attention" in HF, but it is the norm in front of the MLP: both
        # sub-layers normalise their input (pre-norm, Gemma sec. 2).
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = GemmaMLP(config)

    def forward(self, x, cos, sin, mask, slots, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class GemmaModel(nn.Module):
    """The body: token ids (B, T) to final normed hidden states (B, T, D)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, tokens, slots=None, cache=None, pad=None):
        """tokens (B, T). Without a cache, a plain causal forward over T tokens.

        With `cache` (one KVCache per layer), `slots` (T,) are the cache slots the
        tokens fill, and `pad` (B,) counts the left-padding slots of each row,
        which no query sees and which shift that row's RoPE positions.
        """
        B, T = tokens.shape
        if slots is None:
            slots = torch.arange(T, device=tokens.device)
        if pad is None:
            pad = torch.zeros(B, dtype=torch.long, device=tokens.device)
        key_len = cache[0].k.shape[2] if cache is not None else T
        mask = attention_mask(slots, key_len, pad)  # (B, 1, T, S)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_theta)

        x = self.embed_tokens(tokens)  # (B, T, D)
        # Scale by sqrt(D) (the released code's, not the papers'): the rows of the
        # embedding, which is also the LM head, are small, and the scale lifts them to
        # the residual stream's size. The scalar is cast to the activation dtype
        # first, as in the reference: in bf16 it keeps 8 bits (HF PR #29402).
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, slots, cache[i] if cache is not None else None)
        return self.norm(x)  # (B, T, D)


class GemmaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)

    def forward(self, tokens, slots=None, cache=None, pad=None):
        return self.logits(self.model(tokens, slots, cache, pad))  # (B, T, V)

    def logits(self, x):
        # The LM head is the embedding matrix (tied, Gemma sec. 2): a separate head
        # would add vocab x hidden parameters, 0.5B of gemma-2b's 2.5B.
        return F.linear(x, self.model.embed_tokens.weight).float()  # (..., V)

    def make_cache(self, batch, length):
        """One preallocated KVCache per layer, in the dtype and device of the model."""
        c, w = self.config, self.model.embed_tokens.weight
        shape = (batch, c.num_key_value_heads, length, c.head_dim)  # (B, K, S, H)
        zeros = lambda: torch.zeros(shape, dtype=w.dtype, device=w.device)  # noqa: E731
        return nn.ModuleList(KVCache(zeros(), zeros()) for _ in range(c.num_hidden_layers))


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


# Classifier heads, as in transformers: the same body, a linear "score" head.


class GemmaForSequenceClassification(nn.Module):
    def __init__(self, config, num_labels):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.score = nn.Linear(config.hidden_size, num_labels, bias=False)

    def forward(self, tokens):
        logits = self.score(self.model(tokens))  # (B, T, num_labels)
        # Pool at the rightmost token that is not padding (with no pad id, the last
        # token), as transformers does.
        text = tokens != self.config.pad_token_id  # (B, T); all True if the id is None
        last = (torch.arange(tokens.shape[1], device=tokens.device) * text).argmax(dim=-1)  # (B,)
        return logits[torch.arange(len(tokens), device=tokens.device), last]  # (B, num_labels)


class GemmaForTokenClassification(nn.Module):
    def __init__(self, config, num_labels):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.score = nn.Linear(config.hidden_size, num_labels)

    def forward(self, tokens):
        return self.score(self.model(tokens))  # (B, T, num_labels)
