"""The Hugging Face checkpoint directory on disk: read strictly, and written.

A directory holds config.json and model.safetensors, or shards
model-0000i-of-0000n.safetensors that model.safetensors.index.json lists. Each
.safetensors file is read by the `safetensors` library, the format's reference
implementation, which checks its header and offsets; on top of it, a name given
twice is refused, and only float tensors are accepted. A multimodal Gemma 3
directory is read as its text tower (gemma3_text_tower). weights.py builds the
model from what read_hf returns.
"""

import collections
import json
import math
import os
import shutil
import sys
from pathlib import Path

import safetensors
import safetensors.torch
import torch

FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "I32": 4, "I64": 8, **{k: v.itemsize for k, v in FLOAT_DTYPES.items()}}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


# A tensor in a checkpoint file, not read yet; read() gives it as a view of the mapped file.
# rows(a, b), where not None, gives rows a to b only: a block-quantized GGUF tensor is
# dequantized a few rows at a time (gguf_format.py).
Stored = collections.namedtuple("Stored", "file shape dtype read rows", defaults=(None,))


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


# Writing


def write_safetensors(path, tensors):
    """Written by the safetensors library beside `path`, then renamed over it: a reader
    never sees half a file, and a model loaded from `path` keeps its tensors (they map
    the old file). Tensors on the CPU are written from where they lie, with no copy."""
    partial = path.with_name(path.name + ".partial")
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    safetensors.torch.save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, path)


def write_hf(directory, config, state_dict, tokenizer_model=None, max_shard_bytes=5 * 10**9):
    """Write config.json, the safetensors (sharded past max_shard_bytes, named and
    indexed as transformers does) and a copy of tokenizer_model."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards, size = [{}], 0
    for name, t in state_dict.items():
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
        total = sum(t.nbytes for t in state_dict.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, directory / "tokenizer.model")
