"""Read Gemma, Gemma 2 and Gemma 3 (text) checkpoints, strictly, and write the Hugging Face layout.

Two formats are read:
  - a Hugging Face directory: config.json plus model.safetensors, or shards
    model-0000i-of-0000n.safetensors listed in model.safetensors.index.json
    (of a multimodal Gemma 3, its text tower: see gemma3_text_tower);
  - the official PyTorch release (gemma_pytorch): one .ckpt holding
    {"model_state_dict": ...}, no config, q/k/v fused into one qkv_proj.

Checked before any tensor is read, in this order, each failure a CheckpointError
naming the file (and the tensor or the config field):
  - the files: read_safetensors (by the `safetensors` library, the format's
    reference implementation, plus: no name given twice, float dtypes only),
    read_ckpt (torch.load(weights_only=True), which never runs code from the
    file), read_hf (index shard names must be plain file names in the directory);
  - check_sizes: the layer count and widths the tensors imply against
    config.json, so that no config can make the loader allocate or spin;
  - build: the config, by its class (every field's type and range), then the
    model, on the meta device (no memory);
  - check_tensors: every tensor's name and shape against that model.
Then materialize reads the tensors, one at a time. Both formats are memory-mapped:
a tensor already in the wanted dtype on the CPU is used in place (no copy at
all), any other is converted in chunks whose file pages are released as they
are done, so peak memory stays near the size of the loaded model
(benchmarks/load_memory.py).

Command line: python weights.py convert SRC DST [--max-shard-size 5GB]
"""

import argparse
import collections
import ctypes
import dataclasses
import json
import math
import mmap
import os
import pickle
import re
import shutil
import sys
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch

import gemma
import gemma2
import gemma3

# config.json "model_type" -> (module, config class, prefix of the model class names)
FAMILIES = {
    "gemma": (gemma, gemma.GemmaConfig, "Gemma"),
    "gemma2": (gemma2, gemma2.Gemma2Config, "Gemma2"),
    "gemma3_text": (gemma3, gemma3.Gemma3TextConfig, "Gemma3"),  # and the text tower of "gemma3" (gemma3_text_tower)
}
HEADS = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification")
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, **{k: v.itemsize for k, v in FLOAT_DTYPES.items()}}
# madvise, to release pages of a mapped file (Python's mmap.madvise cannot reach torch's mappings).
LIBC = ctypes.CDLL(None) if hasattr(mmap, "MADV_DONTNEED") else None


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


# A tensor in a checkpoint file, not read yet; read() gives it as a view of the mapped file.
Stored = collections.namedtuple("Stored", "file shape dtype read")


# Reading the files


def read_json(path, text=None):
    """The JSON of the file `path` (or `text`, read from it), or an error naming it. A
    name given twice in an object is an error: JSON parsers keep the last silently."""
    def unique(pairs):
        if len({name for name, _ in pairs}) < len(pairs):
            raise ValueError(f"a name given twice in {[name for name, _ in pairs]}"[:200])
        return dict(pairs)
    try:
        return json.loads(path.read_text() if text is None else text, object_pairs_hook=unique)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None


def read_safetensors(path):
    """{name: Stored} of a .safetensors file, memory-mapped by the safetensors library."""
    try:
        f = safetensors.safe_open(path, framework="pt")  # checks the header and offsets
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: {blame(path)}refused by the safetensors library: {e}") from None
    with open(path, "rb") as raw:  # the header it accepted, once more: no name given twice
        read_json(path, raw.read(int.from_bytes(raw.read(8), "little")))
    tensors = {}
    for name in f.keys():
        info = f.get_slice(name)  # the header entry; reads no data
        if info.get_dtype() not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info.get_dtype()}, expected one of {list(FLOAT_DTYPES)}")
        read = lambda f=f, name=name: f.get_tensor(name)  # noqa: E731  a view of the mapped file: no copy
        tensors[name] = Stored(path, tuple(info.get_shape()), FLOAT_DTYPES[info.get_dtype()], read)
    return tensors


def blame(path):
    """"tensor NAME: " for the first tensor to blame in a file the safetensors library
    refused (its message does not always name one): an entry of the wrong types or
    with offsets that disagree with its shape, or whose bytes do not start where the
    previous tensor's end, or end before or after the file; "" if none is to blame."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header, data_size = json.loads(f.read(n)), path.stat().st_size - 8 - n
        entries = {name: e for name, e in header.items() if name != "__metadata__"}
    except Exception:  # noqa: BLE001  no header to find names in
        return ""

    def span(e):  # (begin, end) of a well-formed entry, else None
        try:
            (begin, end), shape, itemsize = e["data_offsets"], e["shape"], ITEMSIZE[e["dtype"]]
            ok = all(type(x) is int and x >= 0 for x in [begin, end, *shape]) and end - begin == math.prod(shape) * itemsize
            return (begin, end) if ok else None
        except (KeyError, TypeError, ValueError):
            return None

    end = 0
    for name, s in sorted(((name, span(e)) for name, e in entries.items()), key=lambda item: item[1] or (-1, -1)):
        if s is None or s[0] != end:
            return f"tensor {name}: "
        end = s[1]
    return f"tensor {name}: " if entries and end != data_size else ""


def read_hf(directory):
    """(config dict, {name: Stored}) of a Hugging Face directory."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json, so not a Hugging Face checkpoint directory")
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_json(index_path)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no weight_map object {{tensor name: shard file}}")
        for shard_name in weight_map.values():
            # A plain file name, so that an index cannot point outside the checkpoint.
            if not isinstance(shard_name, str) or shard_name in ("", ".", "..") or Path(shard_name).name != shard_name:
                raise CheckpointError(f"{index_path}: shard {shard_name!r} is not a file name in {directory}")
        shard_names = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
        weight_map, shard_names = None, ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory}: no model.safetensors and no model.safetensors.index.json")
    tensors = {}
    for shard_name in shard_names:
        shard_path = directory / shard_name
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: lists {shard_name}, which is missing")
        for name, stored in read_safetensors(shard_path).items():
            if weight_map is not None and weight_map.get(name) != shard_name:
                raise CheckpointError(f"{shard_path}: holds {name}, which the index places in {weight_map.get(name)}")
            tensors[name] = stored
    for name, shard_name in (weight_map or {}).items():
        if name not in tensors:
            raise CheckpointError(f"{directory / shard_name}: tensor {name}, listed in the index, is missing")
    return read_json(config_path), config_path, tensors


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


def read(path):
    """(config dict, its file, {name: Stored}) of a checkpoint in either format."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    return gemma3_text_tower(*read_hf(path)) if path.is_dir() else read_ckpt(path)


# The text tower of a multimodal Gemma 3 checkpoint: its tensor names, by layout.
# language_model.model.*: the Hub files and what transformers 5's save_pretrained
# writes; model.language_model.*: Gemma3ForConditionalGeneration's own names
# (written as they are by transformers 4.52 to 4.57); language_model.*: Gemma3Model's.
GEMMA3_TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "language_model.")
GEMMA3_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def gemma3_text_tower(config, config_file, tensors):
    """A multimodal Gemma 3 checkpoint (model_type "gemma3": Gemma3ForConditionalGeneration
    or Gemma3Model) as the gemma3_text model of its text tower; any other unchanged.

    The config is the nested text_config: the fields it leaves out take
    transformers' Gemma3TextConfig defaults, which are gemma3.Gemma3TextConfig's
    own. The text tensors are renamed to Gemma3ForCausalLM's names, and the
    vision tower and projector are skipped, with a message saying so.
    """
    if not isinstance(config, dict) or config.get("model_type") != "gemma3":
        return config, config_file, tensors
    text = config.get("text_config", {})
    if not isinstance(text, dict):
        raise CheckpointError(f"{config_file}: text_config is a {type(text).__name__}, not a JSON object")
    text = text | {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    if "eos_token_id" not in text and "eos_token_id" in config:  # the -it files list <end_of_turn> there
        text["eos_token_id"] = config["eos_token_id"]
    renamed, skipped = {}, 0
    for name, stored in tensors.items():
        if name in ("lm_head.weight", "language_model.lm_head.weight"):
            renamed["lm_head.weight"] = stored  # accepted only if tied (check_tensors)
        elif name.startswith(GEMMA3_VISION_PREFIXES):
            skipped += 1
        else:
            prefix = next((p for p in GEMMA3_TEXT_PREFIXES if name.startswith(p)), None)
            renamed["model." + name.removeprefix(prefix) if prefix else name] = stored  # else: unexpected, check_tensors says so
    print(f"{config_file.parent}: a multimodal Gemma 3 checkpoint: loading its text tower, "
          f"skipping the {skipped} tensors of the vision tower and projector", file=sys.stderr)
    return text, config_file, renamed


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
    src = stored.read()  # a view of the memory-mapped file, in either format
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
    """A model from a Hugging Face directory or an official .ckpt, in eval mode
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
    """The Tokenizer of tokenizer.model in the directory `path`, or beside the file `path`."""
    path = Path(path)
    candidate = (path if path.is_dir() else path.parent) / "tokenizer.model"
    if not candidate.is_file():
        raise FileNotFoundError(f"{candidate}: no tokenizer.model for checkpoint {path}")
    from tokenizer import Tokenizer

    try:
        return Tokenizer(candidate)
    except ValueError as e:  # not a SentencePiece model, or one without Gemma's pieces
        raise CheckpointError(f"{candidate}: {e}") from None


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


def write_safetensors(path, tensors):
    """Written by the safetensors library beside `path`, then renamed over it: a reader
    never sees half a file, and a model loaded from `path` keeps its tensors (they map
    the old file). Tensors on the CPU are written from where they lie, with no copy."""
    partial = path.with_name(path.name + ".partial")
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    safetensors.torch.save_file(tensors, partial, metadata={"format": "pt"})
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


def stored_dtype(path):
    """The dtype of the embedding as stored, so that a conversion keeps it."""
    tensors = read(path)[2]
    return tensors.get("model.embed_tokens.weight", next(iter(tensors.values()))).dtype


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


if __name__ == "__main__":
    main()
