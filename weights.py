"""Read Gemma and Gemma 2 checkpoints, strictly, and write the Hugging Face layout.

Two formats are read:
  - a Hugging Face directory: config.json plus model.safetensors, or shards
    model-0000i-of-0000n.safetensors listed in model.safetensors.index.json;
  - the official PyTorch release (gemma_pytorch): one .ckpt holding
    {"model_state_dict": ...}, no config, q/k/v fused into one qkv_proj.

The model is built on the meta device (no memory), every tensor is checked
against it (present, expected, right shape), and only then are the tensors
read one at a time and assigned. Both formats are memory-mapped (safetensors
here, the .ckpt by torch.load(mmap=True)): a tensor already in the wanted dtype
on the CPU is used in place (no copy at all), any other is converted in chunks
whose file pages are released as they are done, so peak memory stays near the
size of the loaded model (benchmarks/load_memory.py).

Command line: python weights.py convert SRC DST [--max-shard-size 5GB]
"""

import argparse
import ctypes
import dataclasses
import json
import math
import mmap
import os
import pickle
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

import gemma
import gemma2
import gemma3

FAMILIES = {"gemma": gemma, "gemma2": gemma2, "gemma3_text": gemma3}  # config.json "model_type" -> module
CONFIG_CLASSES = {"gemma": gemma.GemmaConfig, "gemma2": gemma2.Gemma2Config, "gemma3_text": gemma3.Gemma3TextConfig}
CLASS_PREFIXES = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3_text": "Gemma3"}  # + "ForCausalLM", ...
HEADS = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")
# madvise, for the tensors torch.load maps too (Python's mmap.madvise cannot reach them).
LIBC = ctypes.CDLL(None) if hasattr(mmap, "MADV_DONTNEED") else None
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


# Reading safetensors


class SafetensorsFile:
    """A .safetensors file, memory-mapped: 8 bytes of header length (little
    endian), a JSON header {name: {"dtype", "shape", "data_offsets"}}, the data."""

    def __init__(self, path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes), not a safetensors file")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise CheckpointError(f"{path}: truncated: the header says {header_len} bytes, the file has {size}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + header_len else None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.start = 8 + header_len  # where the data begins
        self.entries = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
                nbytes = math.prod(shape) * dtype.itemsize if dtype else None
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name} has a malformed header entry {info}") from None
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, expected a float type")
            if self.start + end > size:
                raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {self.start + end}, the file has {size}")
            if end - begin != nbytes:
                raise CheckpointError(f"{path}: tensor {name} spans {end - begin} bytes, but shape {shape} needs {nbytes}")
            self.entries[name] = (dtype, shape, self.start + begin, self.start + end)

    def tensor(self, name):
        """The tensor as a view of the mapped file: no copy, no read until used."""
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin).view(shape)



# Finding the tensors of each format


def read_json(path, key=None):
    """A parsed JSON object (or its `key` entry), or an error naming the file."""
    try:
        d = json.loads(path.read_text())
        return d if key is None else d[key]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid JSON file ({type(e).__name__}: {e})") from None


def read_hf(directory):
    """(config dict, {name: (file, lazy tensor)}) from a Hugging Face directory."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json, so not a Hugging Face checkpoint directory")
    config = read_json(config_path)
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path, "weight_map")
        shard_names = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        shard_names = ["model.safetensors"]
        weight_map = None
    else:
        raise CheckpointError(f"{directory}: no model.safetensors and no model.safetensors.index.json")
    tensors = {}
    for shard_name in shard_names:
        shard_path = directory / shard_name
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: lists {shard_name}, which is missing")
        shard = SafetensorsFile(shard_path)
        for name in shard.entries:
            if weight_map is not None and weight_map.get(name) != shard_name:
                raise CheckpointError(f"{shard_path}: holds {name}, which the index places in {weight_map.get(name)}")
            tensors[name] = (shard, name)
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{directory / shard_name}: tensor {name}, listed in the index, is missing")
    return config, tensors


def read_ckpt(path):
    """(config dict, {name: (file, tensor)}) from an official gemma_pytorch .ckpt.

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
    if not isinstance(state, dict) or "model_state_dict" not in state:
        raise CheckpointError(f"{path}: no 'model_state_dict' in it, so not an official Gemma .ckpt")
    sd = state["model_state_dict"]
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: model_state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
    if any(name.endswith("weight_scaler") for name in sd):
        raise CheckpointError(f"{path}: an int8-quantized release, which is not supported")
    config = official_config(path, sd)
    # Official names -> Hugging Face names; qkv_proj rows are q, then k, then v.
    c = model_config(config, path)[1]
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
    return config, {name: (path, t) for name, t in hf.items()}


def official_config(path, sd):
    """The HF config dict of an official checkpoint: config.json beside it, or the
    preset whose shapes it has."""
    beside = path.parent / "config.json"
    if beside.is_file():
        return read_json(beside)
    try:
        family = "gemma2" if any("pre_feedforward_layernorm" in n for n in sd) else "gemma"
        V, D = sd["embedder.weight"].shape
        L = 1 + max(int(n.split(".")[2]) for n in sd if n.startswith("model.layers."))
        F_ = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
        qkv_rows = sd["model.layers.0.self_attn.qkv_proj.weight"].shape[0]
        q_rows = sd["model.layers.0.self_attn.o_proj.weight"].shape[1]
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{path}: not the tensors of an official Gemma checkpoint (missing {e})") from None
    for name, c in FAMILIES[family].CONFIGS.items():
        H, N, K = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        if (V, D, L, F_, qkv_rows, q_rows) == (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size, (N + 2 * K) * H, N * H):
            return {"model_type": family, **dataclasses.asdict(c)}
    raise CheckpointError(
        f"{path}: shapes (vocab {V}, hidden {D}, {L} layers, ffn {F_}) match no {family} preset "
        f"({', '.join(FAMILIES[family].CONFIGS)}); put a config.json beside it"
    )


# Loading


def read(path):
    """(config dict, {name: (file, tensor)}) of a checkpoint in either format."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    return gemma3_text_tower(*read_hf(path), path) if path.is_dir() else read_ckpt(path)


# The text tower of a multimodal Gemma 3 checkpoint: its tensor names, by layout.
# language_model.model.*: the Hub files and what transformers 5's save_pretrained
# writes; model.language_model.*: Gemma3ForConditionalGeneration's own names
# (written as they are by transformers 4.52 to 4.57); language_model.*: Gemma3Model's.
GEMMA3_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
GEMMA3_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def gemma3_text_tower(config, tensors, source):
    """A multimodal Gemma 3 checkpoint (model_type "gemma3": Gemma3ForConditionalGeneration
    or Gemma3Model) as the gemma3_text model of its text tower; any other unchanged.

    The config is the nested text_config: the fields it leaves out take
    transformers' Gemma3TextConfig defaults, which are gemma3.Gemma3TextConfig's
    own. The text tensors are renamed to Gemma3ForCausalLM's names, and the
    vision tower and projector are skipped, with a message saying so.
    """
    if config.get("model_type") != "gemma3":
        return config, tensors
    text = dict(config.get("text_config") or {})
    text["model_type"], text["architectures"] = "gemma3_text", ["Gemma3ForCausalLM"]
    if "eos_token_id" not in text and "eos_token_id" in config:  # the -it files list <end_of_turn> there
        text["eos_token_id"] = config["eos_token_id"]
    renamed, skipped = {}, 0
    for name, t in tensors.items():
        if name in ("lm_head.weight", "language_model.lm_head.weight"):
            renamed["lm_head.weight"] = t  # accepted only if tied (check_tensors)
        elif name.startswith(GEMMA3_VISION_PREFIXES):
            skipped += 1
        else:
            prefix = next((p for p in GEMMA3_TEXT_PREFIXES if name.startswith(p)), None)
            renamed["model." + name.removeprefix(prefix) if prefix else name] = t  # else: unexpected, check_tensors says so
    print(f"{source}: a multimodal Gemma 3 checkpoint: loading its text tower, "
          f"skipping the {skipped} tensors of the vision tower and projector", file=sys.stderr)
    return text, renamed


def model_config(config, source):
    """(module, config object) of a config dict; errors name `source`."""
    family = config.get("model_type") if isinstance(config, dict) else None
    if family not in FAMILIES:
        raise CheckpointError(f"{source}: model_type {family!r} is not one of {sorted(FAMILIES)}")
    module = FAMILIES[family]
    try:
        return module, CONFIG_CLASSES[family].from_hf(config)
    except (TypeError, ValueError) as e:  # an unsupported setting, a wrong type, ...
        raise CheckpointError(f"{source}: {e}") from None


def build(config, source):
    """The model a config dict describes, on the meta device (no memory yet)."""
    module, cfg = model_config(config, source)
    arch = (config.get("architectures") or ["ForCausalLM"])[0]
    head = next((h for h in HEADS if arch.endswith(h)), None)
    if head is None:
        raise CheckpointError(f"{source}: architecture {arch!r} is not one of {HEADS}")
    cls = getattr(module, CLASS_PREFIXES[config["model_type"]] + head, None)
    if cls is None:  # gemma3.py has a causal LM only
        raise CheckpointError(f"{source}: architecture {arch!r}: {module.__name__}.py has no {head} head")
    with torch.device("meta"):
        if head == "ForCausalLM":
            return cls(cfg)
        labels = config.get("id2label") or {str(i): i for i in range(config.get("num_labels", 2))}
        return cls(cfg, len(labels))


def check_tensors(model, tensors, source):
    """Every expected tensor present with its shape, nothing unexpected."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if "lm_head.weight" in tensors and "lm_head.weight" not in expected:
        # Some exports write the tied LM head out; accept it only if it is tied.
        file, ref = tensors.pop("lm_head.weight")
        embedding = tensors.get("model.embed_tokens.weight")
        if embedding is None or not torch.equal(load_tensor(file, ref), load_tensor(*embedding)):
            raise CheckpointError(f"{file_name(file)}: lm_head.weight differs from model.embed_tokens.weight; Gemma ties them")
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for name, (file, ref) in tensors.items():
        if name not in expected:
            raise CheckpointError(f"{file_name(file)}: unexpected tensor {name}")
        shape = tuple(file.entries[ref][1]) if isinstance(file, SafetensorsFile) else tuple(ref.shape)
        if shape != expected[name]:
            raise CheckpointError(
                f"{file_name(file)}: tensor {name} has shape {shape}, but the config implies {expected[name]}"
            )


def file_name(file):
    return file.path if isinstance(file, SafetensorsFile) else file


def load_tensor(file, ref):
    return file.tensor(ref) if isinstance(file, SafetensorsFile) else ref


def materialize(file, ref, dtype, device):
    """The tensor in dtype on device, with as little extra memory as possible."""
    src = load_tensor(file, ref)  # a view of the memory-mapped file, in either format
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
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(names)}")
        dtype = names[dtype]
    if dtype is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    return device, dtype


def load(path, device=None, dtype=None, progress=True):
    """A model from a Hugging Face directory or an official .ckpt, in eval mode
    with gradients off (`model.requires_grad_(True)` to train it).

    device None: CUDA when available, else CPU; dtype None: bf16 on a CUDA device
    that supports it, float32 otherwise, whatever dtype the file holds.
    """
    start = time.perf_counter()
    path = Path(path)
    device, dtype = default_device_and_dtype(device, dtype)
    config, tensors = read(path)
    model = build(config, path / "config.json" if path.is_dir() else path)
    check_tensors(model, tensors, path)

    total = sum(load_tensor(*t).nbytes for t in tensors.values())
    state, done = {}, 0
    for name, (file, ref) in tensors.items():
        state[name] = materialize(file, ref, dtype, device)
        done += load_tensor(file, ref).nbytes
        if progress and total > 1 << 30 and sys.stderr.isatty():
            print(f"\rloading {path.name}: {done / total:4.0%} of {total / 1e9:.1f} GB", end="", file=sys.stderr)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if progress:
        n = sum(p.numel() for p in model.parameters())
        end = "\n" if total > 1 << 30 and sys.stderr.isatty() else ""
        print(f"{end}loaded {path}: {n:,} parameters, {str(dtype).removeprefix('torch.')} on {device}, "
              f"from {total / 1e6:.1f} MB of tensors in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model


def load_tokenizer(path):
    """The Tokenizer of tokenizer.model in the directory `path`, or beside the file `path`."""
    path = Path(path)
    candidate = (path if path.is_dir() else path.parent) / "tokenizer.model"
    if not candidate.is_file():
        raise FileNotFoundError(f"{candidate}: no tokenizer.model for checkpoint {path}")
    from tokenizer import Tokenizer

    return Tokenizer(candidate)


# Writing the Hugging Face layout


def hf_config(model):
    """config.json for a model: every config field under its HF name."""
    family = {cls: name for name, cls in CONFIG_CLASSES.items()}[type(model.config)]
    config = {"architectures": [type(model).__name__], "model_type": family, **vars(model.config)}
    if hasattr(model, "score"):
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.score.out_features)}
        config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config["tie_word_embeddings"] = True
    config["dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    return config


def write_safetensors(path, tensors):
    dtype_names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    # Written beside, then renamed over `path`: a reader never sees half a file, and
    # a model loaded from `path` keeps its tensors (they map the old file).
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            if t.nbytes:  # the bytes as they lie in memory: no copy on the CPU
                f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy())
    os.replace(partial, path)


def save_hf(model, directory, tokenizer_model=None, max_shard_bytes=5 * 10**9):
    """Write config.json, the safetensors (sharded past max_shard_bytes, named and
    indexed as transformers does) and a copy of tokenizer_model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
    shards, size = [{}], 0
    for name, t in model.state_dict().items():
        if size + t.nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            shard_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / shard_name, shard)
            weight_map.update({name: shard_name for name in shard})
        total = sum(t.nbytes for t in model.state_dict().values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, directory / "tokenizer.model")


def parse_size(text):
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="write a Hugging Face directory from either format")
    convert.add_argument("src", help="a Hugging Face directory or an official .ckpt")
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
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
    print(f"wrote {args.dst}", file=sys.stderr)


def stored_dtype(path):
    """The dtype of the embedding as stored, so that a conversion keeps it."""
    _, tensors = read(path)
    return load_tensor(*tensors["model.embed_tokens.weight"] if "model.embed_tokens.weight" in tensors else next(iter(tensors.values()))).dtype


if __name__ == "__main__":
    main()
