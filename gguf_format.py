"""llama.cpp's GGUF file (what llama.cpp, Ollama and LM Studio keep), read strictly.

A .gguf file holds metadata (typed key/value pairs: the architecture's numbers,
the tokenizer's pieces) and tensors, each in its own type: F32, F16, BF16 or one
of the block-quantized types (Q8_0, Q4_0, Q4_K, Q6_K, ...). It is parsed by the
`gguf` package (gguf-py, written and kept by llama.cpp's authors), memory-mapped,
and dequantized by its own `gguf.quants.dequantize`, a few rows at a time.

This reader is the inverse of llama.cpp's converter, convert_hf_to_gguf.py
(GemmaModel, Gemma2Model, Gemma3Model; github.com/ggml-org/llama.cpp at commit
a458664fc83b6513baea7adafcb0ef0626b006f8), and reads the metadata as llama.cpp's
loader does (src/llama-model.cpp, load_hparams, LLM_ARCH_GEMMA / GEMMA2 / GEMMA3):
  - tensor names are llama.cpp's (token_embd, blk.N.attn_q, ...; TENSOR_NAMES);
  - every "...norm.weight" was written as weight + 1, since llama.cpp's RMSNorm
    multiplies by w where Gemma's multiplies by (1 + w): 1 is subtracted again;
  - shapes are listed innermost first (token_embd is [hidden, vocab]): reversed;
  - the config comes from the metadata, plus what llama.cpp hard-codes instead of
    storing (see config_from_metadata). Where transformers' own GGUF reader keeps
    its defaults instead, the two disagree (gemma-2-27b, gemma-3-4b/12b/27b files);
    llama.cpp is the reference, since its converter wrote the file.
read_gguf returns what hf_format.read_hf returns: a config dict in config.json's
names and {Hugging Face tensor name: Stored}; weights.py checks and builds the
model from it. tokenizer_model rebuilds the file's tokenizer as a SentencePiece model.
"""

import math
import re

import gguf
import numpy as np
import sentencepiece.sentencepiece_model_pb2 as sp_model
import torch

from hf_format import CheckpointError, Stored

# general.architecture -> config.json "model_type"
ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}

# llama.cpp's tensor names (gguf-py, tensor_mapping.py) -> Hugging Face's. The
# norm after attention is ffn_norm in Gemma 1 (it is the pre-MLP norm, whatever
# transformers calls it) and post_attention_norm in Gemma 2 and 3, where ffn_norm
# is the pre-feedforward norm of the sandwich.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # tied: accepted only if equal to the embedding
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # Gemma 3
    "attn_k_norm": "self_attn.k_norm",  # Gemma 3
    "post_attention_norm": "post_attention_layernorm",  # Gemma 2, 3
    "ffn_norm": "pre_feedforward_layernorm",  # Gemma 2, 3; Gemma 1: post_attention_layernorm
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",  # Gemma 2, 3
}

PLAIN_TYPES = {  # tensor types held as plain arrays: read in place, no dequantizing
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
    gguf.GGMLQuantizationType.F64: torch.float64,
}
INTEGER_TYPES = {gguf.GGMLQuantizationType[t] for t in ("I8", "I16", "I32", "I64")}


class Reader(gguf.GGUFReader):
    """gguf's reader, strict where it is lenient: it slices the mapped file without
    checking its end (a truncated file becomes short arrays, or a reshape error that
    names no tensor), and takes each tensor's offset on trust. Here a read past the
    end is an error, one in a tensor's data names the tensor, and the tensors must
    tile the data as every writer lays them out."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if type(self.data) is np.memmap:
            # The same mapping as a plain array: np.memmap's slicing costs 10 us a call,
            # and the reader slices once per token of the tokenizer (10 s of 16 s
            # opening gemma-3-270m).
            self.data = self.data.view(np.ndarray)
        end = offset + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise EOFError(f"needs bytes up to {end:,}, but the file ends at {len(self.data):,}")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
        tensors = []
        for field in fields:  # one at a time, to name the tensor that fails
            name = bytes(field.parts[1]).decode("utf-8", "replace")
            if any(t.name == name for t in tensors):
                raise ValueError(f"tensor {name} is listed twice")
            try:
                super()._build_tensors(start_offs, [field])
            except (EOFError, ValueError, KeyError) as e:  # past the end; an unknown type
                raise ValueError(f"tensor {name}: {e}") from None
            tensors += self.tensors
        self.tensors = tensors
        # Every writer (gguf-py's, ggml's gguf.cpp) lays the data out back to back, each
        # tensor padded to the alignment. A tensor that starts elsewhere, or ends past the
        # next one's start, has a type, shape or offset that disagrees with the data.
        expected = start_offs
        for t in sorted(tensors, key=lambda t: t.data_offset):
            if t.data_offset != expected:
                raise ValueError(f"tensor {t.name}: its data starts at byte {t.data_offset:,}, but the tensors "
                                 f"before it, by their types and shapes, end at byte {expected:,}")
            expected += -(-int(t.n_bytes) // self.alignment) * self.alignment


def open_gguf(path):
    """The parsed file, or a CheckpointError naming it and what is wrong."""
    try:
        # mode "c" (copy-on-write): the arrays are writable for torch.from_numpy, and
        # nothing is ever written back to the file.
        return Reader(path, mode="c")
    except Exception as e:  # noqa: BLE001  the library reports a bad file in many types
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


class Metadata:
    """The file's key/value pairs, each read with its expected type or refused by key."""

    def __init__(self, reader, path):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key):
        return key in self.fields

    def get(self, key, kind, default=None):
        if key not in self.fields:
            if default is None:
                raise CheckpointError(f"{self.path}: metadata key {key} is missing")
            return default
        try:
            value = self.fields[key].contents()
        except Exception as e:  # noqa: BLE001  a value the library cannot decode
            raise CheckpointError(f"{self.path}: metadata key {key} cannot be read ({type(e).__name__}: {e})") from None
        ok = {
            int: type(value) is int,
            float: type(value) in (int, float) and math.isfinite(value),
            str: type(value) is str,
            bool: type(value) is bool,
            list: type(value) is list,
        }[kind]
        if not ok:
            what = {int: "an integer", float: "a finite number", str: "a string", bool: "a boolean", list: "an array"}[kind]
            raise CheckpointError(f"{self.path}: metadata key {key} = {value!r:.80}: expected {what}")
        return value


def hf_name(name, arch):
    """The Hugging Face name of a llama.cpp tensor name; an unknown one unchanged
    (weights.check_tensors then refuses it by that name)."""
    if name in TENSOR_NAMES:
        return TENSOR_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m is None or m[2] not in LAYER_NAMES:
        return name
    hf = LAYER_NAMES[m[2]]
    if arch == "gemma" and m[2] == "ffn_norm":
        hf = "post_attention_layernorm"
    return f"model.layers.{int(m[1])}.{hf}.weight"


def stored(tensor, path, norm):
    """A tensor of the file, not read yet (hf_format.Stored): read() gives it whole
    as torch sees it (a view of the mapped file for the plain types, dequantized to
    float32 for the others); rows(a, b), for a quantized 2-D tensor, rows a to b.
    `norm`: stored as weight + 1 by the converter, given back as weight."""
    kind = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists ne0 (the innermost) first

    def read():
        if kind == gguf.GGMLQuantizationType.BF16:  # numpy has no bfloat16: the reader gives bytes
            t = torch.from_numpy(tensor.data).view(torch.bfloat16).view(shape)
        elif kind in PLAIN_TYPES:
            t = torch.from_numpy(tensor.data).view(shape)
        else:
            t = torch.from_numpy(gguf.quants.dequantize(tensor.data, kind)).view(shape)
        return t.float() - 1 if norm else t

    def rows(a, b):  # a block never spans rows: each row is whole blocks
        return torch.from_numpy(gguf.quants.dequantize(tensor.data[a:b], kind))

    quantized = kind not in PLAIN_TYPES
    dtype = torch.float32 if quantized or norm else PLAIN_TYPES[kind]
    return Stored(path, shape, dtype, read, rows if quantized and len(shape) == 2 and not norm else None)


def read_gguf(path):
    """(config dict, its file, {name: Stored}) of a .gguf file of a Gemma."""
    reader = open_gguf(path)
    meta = Metadata(reader, path)
    arch = meta.get("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: general.architecture is {arch!r}, not one of {sorted(ARCHITECTURES)}")
    tensors = {}
    for t in reader.tensors:
        if t.tensor_type in INTEGER_TYPES:
            raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, expected a float or quantized type")
        if t.tensor_type not in PLAIN_TYPES:
            try:  # a type the library can parse but not dequantize (one row: no cost)
                gguf.quants.dequantize(t.data[:1], t.tensor_type)
            except NotImplementedError:
                raise CheckpointError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf library cannot dequantize") from None
        name = hf_name(t.name, arch)
        tensors[name] = stored(t, path, norm=name.endswith("norm.weight"))
    return config_from_metadata(meta, arch, tensors), path, tensors


def config_from_metadata(meta, arch, tensors):
    """The config.json the file was converted from, as llama.cpp's loader reads it."""
    a = arch + "."
    get = meta.get
    N = get(a + "attention.head_count", int)
    D = get(a + "embedding_length", int)
    # llama.cpp's default head width is hidden / heads; Gemma's converters always
    # write it (gemma-7b's 256 is wider than 3072 / 16).
    H = get(a + "attention.key_length", int, D // N if N else 1)
    if get(a + "attention.value_length", int, H) != H:
        raise CheckpointError(f"{meta.path}: metadata {a}attention.value_length differs from {a}attention.key_length ({H}): Gemma's are equal")
    L = get(a + "block_count", int)
    embedding = tensors.get("model.embed_tokens.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise CheckpointError(f"{meta.path}: no 2-D tensor token_embd.weight, the embedding")
    config = {
        "model_type": ARCHITECTURES[arch],
        "architectures": ["ForCausalLM"],
        # Gemma 3's converter drops the embedding's 64 image-token rows (262208 ->
        # 262144, the tokenizer's size): the tensor says how many there are.
        "vocab_size": embedding.shape[0],
        "hidden_size": D,
        "intermediate_size": get(a + "feed_forward_length", int),
        "num_hidden_layers": L,
        "num_attention_heads": N,
        "num_key_value_heads": get(a + "attention.head_count_kv", int, N),
        "head_dim": H,
        "rms_norm_eps": get(a + "attention.layer_norm_rms_epsilon", float),
        "max_position_embeddings": get(a + "context_length", int),
        # llama.cpp's default base is 10,000 when the key is missing, for all three.
        "rope_theta": get(a + "rope.freq_base", float, 10_000.0),
        "bos_token_id": get("tokenizer.ggml.bos_token_id", int, 2),
        "eos_token_id": get("tokenizer.ggml.eos_token_id", int, 1),
        "pad_token_id": get("tokenizer.ggml.padding_token_id", int, 0),
    }
    # The 27B models scale queries by hidden / heads (144 and 168), not head_dim
    # (128). No key says so: llama.cpp recognises the 27B by its layer count (46 in
    # Gemma 2, 62 in Gemma 3; llama-model.cpp, after gemma_pytorch's config.py).
    is_27b = L == {"gemma": None, "gemma2": 46, "gemma3": 62}[arch]
    config["query_pre_attn_scalar"] = D // N if is_27b and N else H
    if arch == "gemma2":
        # Optional keys, with llama.cpp's defaults (llama-hparams.h): caps 50 and 30,
        # window 4096; the pattern is hard-coded: even layers local (set_swa_pattern(2)).
        config["attn_logit_softcapping"] = get(a + "attn_logit_softcapping", float, 50.0)
        config["final_logit_softcapping"] = get(a + "final_logit_softcapping", float, 30.0)
        config["sliding_window"] = get(a + "attention.sliding_window", int, 4096)
    if arch == "gemma3":
        # Hard-coded by llama.cpp: the local layers' RoPE base 10,000, unscaled
        # (newer converters also write rope.freq_base_swa), and five local layers,
        # then one global (set_swa_pattern(6)). A file without a window is all global.
        config["rope_local_base_freq"] = get(a + "rope.freq_base_swa", float, 10_000.0)
        window = get(a + "attention.sliding_window", int, 0)
        config["sliding_window"] = window or 1
        if not window:
            config["layer_types"] = ["full_attention"] * L
        # The global layers' linear position scaling (4B, 12B, 27B: factor 8).
        kind = get(a + "rope.scaling.type", str, "none")
        factor = get(a + "rope.scaling.factor", float, 1.0)
        if a + "rope.scale_linear" in meta:  # older converters' key for the same factor
            kind, factor = "linear", get(a + "rope.scale_linear", float)
        if kind not in ("none", "linear"):
            raise CheckpointError(f"{meta.path}: metadata {a}rope.scaling.type is {kind!r}: Gemma 3 scales linearly or not at all")
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor} if kind == "linear" and factor != 1.0 else None
        if a + "final_logit_softcapping" in meta:  # refused by the config, naming the field
            config["final_logit_softcapping"] = get(a + "final_logit_softcapping", float)
    check_metadata(meta, a, config, tensors)
    return config


def check_metadata(meta, a, config, tensors):
    """The metadata's widths and counts against the tensors' shapes, by key."""
    layers = {int(m[1]) for name in tensors if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    H = config["head_dim"]
    implied = [
        ("block_count", config["num_hidden_layers"], len(layers), "layers of tensors (blk.N)"),
        ("embedding_length", config["hidden_size"], ("model.embed_tokens.weight", 1), "token_embd.weight"),
        ("feed_forward_length", config["intermediate_size"], ("model.layers.0.mlp.gate_proj.weight", 0), "blk.0.ffn_gate.weight"),
        ("attention.head_count", config["num_attention_heads"] * H, ("model.layers.0.self_attn.q_proj.weight", 0), "blk.0.attn_q.weight"),
        ("attention.head_count_kv", config["num_key_value_heads"] * H, ("model.layers.0.self_attn.k_proj.weight", 0), "blk.0.attn_k.weight"),
    ]
    for key, value, found, tensor in implied:
        if isinstance(found, tuple):
            name, dim = found
            if name not in tensors or len(tensors[name].shape) != 2:
                continue  # weights.check_tensors names the missing or misshapen tensor
            found = tensors[name].shape[dim]
        if value != found:
            what = f"{value} ({key} x attention.key_length)" if "head_count" in key else value
            raise CheckpointError(f"{meta.path}: metadata {a}{key} gives {what}, but the file has {found} in {tensor}")


def tokenizer_model(path):
    """The serialized SentencePiece model of the file's tokenizer (what tokenizer.model
    held before llama.cpp's converter copied its pieces into the metadata)."""
    meta = Metadata(open_gguf(path), path)
    if meta.get("tokenizer.ggml.model", str) != "llama":  # llama.cpp's name for SentencePiece
        raise CheckpointError(f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model', str)!r}, not a SentencePiece tokenizer ('llama')")
    pieces, scores, types = (meta.get("tokenizer.ggml." + k, list) for k in ("tokens", "scores", "token_type"))
    if not len(pieces) == len(scores) == len(types):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens, scores and token_type have {len(pieces)}, {len(scores)} and {len(types)} entries")
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id", int, d) for k, d in [("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0)]}
    for key, i in ids.items():
        if not 0 <= i < len(pieces):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key}_token_id {i} is not an id of its {len(pieces)} tokens")
    Piece = sp_model.ModelProto.SentencePiece
    model = sp_model.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(pieces, scores, types)):
        # llama.cpp's token types are SentencePiece's (1 normal ... 6 byte), but for
        # two rewrites in the converter (_create_vocab_sentencepiece), undone here:
        if kind == 4:  # user-defined pieces had U+2581 turned into plain spaces
            piece = piece.replace(" ", "\u2581")
        if kind == 3 and i == ids["unknown"]:
            kind = Piece.UNKNOWN
        elif kind == 3 and i not in (ids["bos"], ids["eos"], ids["padding"]):
            # every special token of tokenizer_config.json became a control token, which
            # SentencePiece never matches in text; in tokenizer.model <start_of_turn> and
            # the like are user-defined pieces, matched whole.
            kind = Piece.USER_DEFINED
        if kind not in Piece.Type.values():
            raise CheckpointError(f"{path}: tokenizer.ggml.token_type[{i}] is {kind}, not a SentencePiece piece type")
        model.pieces.add(piece=piece, score=score, type=kind)
    # Gemma's settings (arXiv 2403.08295 sec. 2): BPE, byte fallback, no
    # normalisation, no dummy prefix (add_space_prefix is false in every Gemma file).
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = sp_model.TrainerSpec.BPE, len(pieces), 6 in types
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = (pieces[ids[k]] for k in ("unknown", "bos", "eos", "padding"))
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces = "identity", meta.get("tokenizer.ggml.add_space_prefix", bool, False), False
    return model.SerializeToString()
