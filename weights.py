"""Read Gemma, Gemma 2 and Gemma 3 (text) checkpoints, strictly, and write the Hugging Face layout.

Three formats are read:
  - a Hugging Face directory: config.json plus model.safetensors, or shards
    model-0000i-of-0000n.safetensors listed in model.safetensors.index.json
    (of a multimodal Gemma 3, its text tower), read and written by hf_format.py;
  - the official PyTorch release (gemma_pytorch): one .ckpt holding
    {"model_state_dict": ...}, no config, q/k/v fused into one qkv_proj;
  - llama.cpp's .gguf (also Ollama's and LM Studio's), tensors in any type the
    `gguf` library can dequantize, the config and the tokenizer in its metadata:
    gguf_format.py.

Checked before any tensor is read, in this order, each failure a CheckpointError
naming the file (and the tensor or the config field):
  - the files: hf_format.read_hf (each .safetensors by the `safetensors`
    library, the format's reference implementation, plus: no name given twice,
    float dtypes only; index shard names must be plain file names in the
    directory), read_ckpt (torch.load(weights_only=True), which never runs code
    from the file), gguf_format.read_gguf (the `gguf` library's parser, plus: no
    read past the end of the file, no tensor given twice, the metadata's widths
    against the tensors' shapes);
  - check_sizes: the layer count and widths the tensors imply against
    config.json, so that no config can make the loader allocate or spin;
  - build: the config, by its class (every field's type and range), then the
    model, on the meta device (no memory);
  - check_tensors: every tensor's name and shape against that model.
Then materialize reads the tensors, one at a time. Both formats are memory-mapped:
a tensor already in the wanted dtype on the CPU is used in place (no copy at
all), any other is converted in chunks whose file pages are released as they
are done, so peak memory stays near the size of the loaded model
(benchmarks/load_memory.py); a quantized GGUF tensor is dequantized 64 MB of rows
at a time, straight into the loaded model's memory.

Command line: python weights.py convert SRC DST [--max-shard-size 5GB]
"""

import argparse
import ctypes
import dataclasses
import math
import mmap
import pickle
import re
import sys
import time
from pathlib import Path

import torch

import gemma
import gemma2
import gemma3
import gguf_format
import hf_format
from hf_format import CheckpointError, Stored, read_json

# config.json "model_type" -> (module, config class, prefix of the model class names)
FAMILIES = {
    "gemma": (gemma, gemma.GemmaConfig, "Gemma"),
    "gemma2": (gemma2, gemma2.Gemma2Config, "Gemma2"),
    "gemma3_text": (gemma3, gemma3.Gemma3TextConfig, "Gemma3"),  # and the text tower of "gemma3" (gemma3_text_tower)
}
HEADS = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")
# madvise, to release pages of a mapped file (Python's mmap.madvise cannot reach torch's mappings).
LIBC = ctypes.CDLL(None) if hasattr(mmap, "MADV_DONTNEED") else None


# Reading the official .ckpt (the Hugging Face directory: hf_format.py)


def read_ckpt(path):
    """(config dict, its file, {name: Stored}) of an official gemma_pytorch .ckpt.

    The release holds no config: it is inferred from the tensor shapes and must
    match a preset, unless a config.json lies beside the file.
    """
    try:
        # weights_only: the unpickler builds tensors and plain containers, never
        # runs code from the file. mmap: tensors stay in the file until read.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # torch's message names the refused global
        why = next((line for line in str(e).splitlines() if "GLOBAL" in line), str(e))
        raise CheckpointError(f"{path}: refused: its pickle would call code, not only build tensors ({why.strip()})") from None
    except Exception as e:  # torch reports a bad zip, a refused pickle, ... in many types
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    sd = state.get("model_state_dict") if isinstance(state, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: no 'model_state_dict' in it, so not an official Gemma .ckpt")
    for name, t in sd.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: model_state_dict[{name!r}] is a {type(t).__name__}, not a named tensor")
        if not (t.is_floating_point() or name == "freqs_cis"):  # freqs_cis: complex, and dropped
            raise CheckpointError(f"{path}: tensor {name} has dtype {t.dtype}, expected a float type")
    if any(name.endswith("weight_scaler") for name in sd):
        raise CheckpointError(f"{path}: an int8-quantized release, which is not supported")
    config, config_file = official_config(path, sd)
    # Official names -> Hugging Face names; qkv_proj rows are q, then k, then v.
    check_sizes(config, sd, config_file)
    c = model_config(config, config_file)[1]
    rows = [c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_key_value_heads * c.head_dim]
    hf = {}
    for name, t in sd.items():
        if name == "freqs_cis":  # the RoPE table, recomputed by the model
            continue
        if name == "embedder.weight":
            hf["model.embed_tokens.weight"] = t
        elif name.endswith("qkv_proj.weight"):
            if t.dim() != 2 or t.shape[0] != sum(rows):
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, but the config implies {sum(rows)} rows of q, k, v {rows}")
            q, k, v = t.split(rows, dim=0)
            prefix = name.removesuffix("qkv_proj.weight")
            hf[prefix + "q_proj.weight"], hf[prefix + "k_proj.weight"], hf[prefix + "v_proj.weight"] = q, k, v
        else:
            hf[name] = t
    return config, config_file, {name: Stored(path, tuple(t.shape), t.dtype, lambda t=t: t) for name, t in hf.items()}


def official_config(path, sd):
    """(config dict, its file) of an official checkpoint: config.json beside it, or
    the preset whose shapes it has."""
    beside = path.parent / "config.json"
    if beside.is_file():
        return read_json(beside), beside
    try:
        family = "gemma2" if any("pre_feedforward_layernorm" in n for n in sd) else "gemma"
        V, D = sd["embedder.weight"].shape
        L = 1 + max(int(n.split(".")[2]) for n in sd if n.startswith("model.layers."))
        F_ = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
        qkv_rows = sd["model.layers.0.self_attn.qkv_proj.weight"].shape[0]
        q_rows = sd["model.layers.0.self_attn.o_proj.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: not the tensors of an official Gemma checkpoint (missing {e})") from None
    presets = FAMILIES[family][0].CONFIGS
    for c in presets.values():
        H, N, K = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        if (V, D, L, F_, qkv_rows, q_rows) == (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size, (N + 2 * K) * H, N * H):
            return {"model_type": family, **dataclasses.asdict(c)}, path
    raise CheckpointError(
        f"{path}: shapes (vocab {V}, hidden {D}, {L} layers, ffn {F_}) match no {family} preset "
        f"({', '.join(presets)}); put a config.json beside it"
    )


def is_gguf(path):
    """A .gguf file, by its name or by its first four bytes (the magic "GGUF")."""
    if path.suffix == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read(path):
    """(config dict, its file, {name: Stored}) of a checkpoint in any of the formats."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    if path.is_dir():
        return hf_format.gemma3_text_tower(*hf_format.read_hf(path))
    return gguf_format.read_gguf(path) if is_gguf(path) else read_ckpt(path)


# Checking the config, then the tensors, against each other


def check_sizes(config, tensors, source):
    """The layer count and widths the tensors imply equal config.json's. Checked before
    the config is read (Gemma 2's lists each layer's type) and the model built, so that
    no config can make the loader spin through a million layers. A value of a wrong
    type is left to the config class, which names the field."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: holds a {type(config).__name__}, not a JSON object")
    layers = len({m[1] for name in tensors if (m := re.match(r"model\.layers\.(\d+)\.", name))})
    implied = [("num_hidden_layers", layers, "layers")]
    for name, dim, field in [("model.embed_tokens.weight", 0, "vocab_size"), ("model.embed_tokens.weight", 1, "hidden_size"),
                             ("model.layers.0.mlp.gate_proj.weight", 0, "intermediate_size")]:
        if name in tensors and len(tensors[name].shape) == 2:
            implied.append((field, tensors[name].shape[dim], f"in dim {dim} of tensor {name}"))
    for field, value, where in implied:
        if type(config.get(field)) is int and config[field] != value:
            raise CheckpointError(f"{source}: {field} is {config[field]}, but the checkpoint has {value} {where}")


def model_config(config, source):
    """(module, config object) of a config dict; the config class checks every field."""
    family = config.get("model_type")
    if not isinstance(family, str) or family not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {family!r} is not one of {sorted(FAMILIES)}")
    try:
        return FAMILIES[family][0], FAMILIES[family][1].from_hf(config)
    except ValueError as e:  # names the field
        raise CheckpointError(f"{source}: {e}") from None


def build(config, source):
    """The model config.json describes (its family and head), on the meta device: no memory."""
    module, cfg = model_config(config, source)
    archs = config.get("architectures") or ["ForCausalLM"]
    arch = archs[0] if isinstance(archs, list) and isinstance(archs[0], str) else repr(archs)
    head = next((h for h in HEADS if arch.endswith(h)), None)
    if head is None:
        raise CheckpointError(f"{source}: architecture {arch!r} is not one of {HEADS}")
    cls = getattr(module, FAMILIES[config["model_type"]][2] + head, None)
    if cls is None:  # gemma3.py has a causal LM only
        raise CheckpointError(f"{source}: architecture {arch!r}: {module.__name__}.py has no {head} head")
    if head == "ForCausalLM":
        with torch.device("meta"):
            return cls(cfg)
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) and labels else config.get("num_labels", 2)
    if type(num_labels) is not int or num_labels < 1:
        raise CheckpointError(f"{source}: num_labels {num_labels!r} is not an integer >= 1")
    with torch.device("meta"):
        return cls(cfg, num_labels)


def check_tensors(model, tensors, source):
    """Every expected tensor present with its shape, nothing unexpected."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    lm_head = tensors.pop("lm_head.weight", None) if "lm_head.weight" not in expected else None
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for name, stored in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{stored.file}: unexpected tensor {name}")
        if stored.shape != expected[name]:
            raise CheckpointError(f"{stored.file}: tensor {name} has shape {stored.shape}, but the config implies {expected[name]}")
    # Some exports write the tied LM head out; accept it only if it is the embedding.
    embedding = tensors["model.embed_tokens.weight"]
    if lm_head is not None and (lm_head.shape != embedding.shape or not torch.equal(lm_head.read(), embedding.read())):
        raise CheckpointError(f"{lm_head.file}: lm_head.weight differs from model.embed_tokens.weight; Gemma ties them")


# Loading


def materialize(stored, dtype, device):
    """The tensor in dtype on device, with as little extra memory as possible."""
    if stored.rows is not None:  # block-quantized (GGUF): dequantized 64 MB of rows at a time
        dst = torch.empty(stored.shape, dtype=dtype, device=device)
        step = max(1, (64 << 20) // (4 * stored.shape[1]))
        for a in range(0, stored.shape[0], step):
            dst[a : a + step] = stored.rows(a, a + step)
        return dst
    src = stored.read()  # a view of the memory-mapped file, in any format
    if src.dtype == dtype and device.type == "cpu":
        return src  # the mapped file itself: no copy
    dst = torch.empty(src.shape, dtype=dtype, device=device)
    if not src.is_contiguous():  # rare: a .ckpt saved from a transposed view
        return dst.copy_(src)
    step = (64 << 20) // src.element_size()  # chunks of 64 MB
    for a in range(0, src.numel(), step):
        chunk = src.view(-1)[a : a + step]
        dst.view(-1)[a : a + step].copy_(chunk)
        release(chunk)  # done with these pages of the file
    return dst


def release(mapped):
    """Drop the pages under `mapped`, a view of a memory-mapped file that was only
    read, from this process's memory: the file stays, and reading them again would
    fault them back in. (On ordinary memory MADV_DONTNEED would zero it instead.)"""
    page = mmap.PAGESIZE
    begin = -(-mapped.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (mapped.data_ptr() + mapped.nbytes) // page * page
    if end > begin and LIBC is not None:
        LIBC.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), mmap.MADV_DONTNEED)


def default_device_and_dtype(device, dtype):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}")
        dtype = names[dtype]
    if dtype is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    return device, dtype


def load(path, device=None, dtype=None, progress=True):
    """A model from a Hugging Face directory, an official .ckpt or a .gguf, in eval mode
    with gradients off (`model.requires_grad_(True)` to train it).

    device None: CUDA when available, else CPU; dtype None: bf16 on a CUDA device
    that supports it, float32 otherwise, whatever dtype the file holds.
    """
    start = time.perf_counter()
    path = Path(path)
    device, dtype = default_device_and_dtype(device, dtype)
    config, config_file, tensors = read(path)
    check_sizes(config, tensors, config_file)
    model = build(config, config_file)
    index = path / "model.safetensors.index.json"
    check_tensors(model, tensors, path if not path.is_dir() else index if index.is_file() else path / "model.safetensors")

    state = {name: materialize(stored, dtype, device) for name, stored in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if progress:
        n, total = sum(p.numel() for p in model.parameters()), sum(math.prod(s.shape) * s.dtype.itemsize for s in tensors.values())
        print(f"loaded {path}: {n:,} parameters, {str(dtype).removeprefix('torch.')} on {device}, "
              f"from {total / 1e6:.1f} MB of tensors in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def load_tokenizer(path):
    """The Tokenizer of tokenizer.model in the directory `path`, or beside the file
    `path`; of a .gguf file, the tokenizer the file carries."""
    path = Path(path)
    from tokenizer import Tokenizer

    if path.is_file() and is_gguf(path):
        source, proto = path, gguf_format.tokenizer_model(path)
    else:
        source, proto = (path if path.is_dir() else path.parent) / "tokenizer.model", None
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no tokenizer.model for checkpoint {path}")
    try:
        return Tokenizer(source, proto)
    except ValueError as e:  # not a SentencePiece model, or one without Gemma's pieces
        raise CheckpointError(f"{source}: {e}") from None


# Writing the Hugging Face layout


def hf_config(model):
    """config.json for a model: every config field under its HF name."""
    family = next(name for name, (_, config_class, _) in FAMILIES.items() if type(model.config) is config_class)
    config = {"architectures": [type(model).__name__], "model_type": family, **vars(model.config)}
    if hasattr(model, "score"):
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.score.out_features)}
        config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config["tie_word_embeddings"] = True
    config["dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    return config


def save_hf(model, directory, tokenizer_model=None, max_shard_bytes=5 * 10**9):
    """Write config.json, the safetensors (sharded past max_shard_bytes, named and
    indexed as transformers does) and a copy of tokenizer_model."""
    hf_format.write_hf(Path(directory), hf_config(model), model.state_dict(), tokenizer_model, max_shard_bytes)


def parse_size(text):
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def stored_dtype(path):
    """The dtype of the embedding as stored (float32 if block-quantized), so that a
    conversion keeps it."""
    tensors = read(path)[2]
    return tensors.get("model.embed_tokens.weight", next(iter(tensors.values()))).dtype


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="write a Hugging Face directory from any of the formats")
    convert.add_argument("src", help="a Hugging Face directory, an official .ckpt or a .gguf")
    convert.add_argument("dst", help="the directory to write")
    convert.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    convert.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    try:
        # Refuse to write over anything: files left from an earlier conversion would
        # mix with the new ones (transformers prefers a stale model.safetensors to shards).
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise FileExistsError(f"{dst}: exists and is not an empty directory")
        model = load(src, device="cpu", dtype=args.dtype or stored_dtype(src))
        tokenizer = (src if src.is_dir() else src.parent) / "tokenizer.model"
        save_hf(model, dst, tokenizer if tokenizer.is_file() else None, parse_size(args.max_shard_size))
        if src.is_file() and is_gguf(src):  # its tokenizer, as the tokenizer.model it came from
            (dst / "tokenizer.model").write_bytes(gguf_format.tokenizer_model(src))
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
    print(f"wrote {args.dst}", file=sys.stderr)


if __name__ == "__main__":
    main()
