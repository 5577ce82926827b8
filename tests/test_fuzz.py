"""Fuzz: a malformed checkpoint is refused with a CheckpointError naming its file, a valid one loads.

Seeded mutations of copies of both demo checkpoints (checkpoints/ is never
touched), of a sharded copy of each, of an official .ckpt and of a GGUF file
synthesized from the Gemma 2 demo: config fields set to wrong types,
out-of-range and boundary values; safetensors headers with bad offsets, shapes,
dtypes, lengths and JSON; index files; GGUF metadata, tensor lists and offsets;
truncated and padded files; tokenizer files. Each outcome is one of
  - "loaded": a model whose logits are finite (the mutation was a valid variation),
  - "refused": a CheckpointError whose message names the checkpoint and the file,
within 5 seconds; any other exception fails the test. Then the rows of issue 11's
table, one plain test each.
"""

import json
import math
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gemma
import gemma2
import gguf
import hf_format
import transformers
import weights
from test_gguf import Q, write_gguf
from test_weights import official_state_dict

ROOT = Path(__file__).resolve().parents[1]
DEMOS = {"gemma": ROOT / "checkpoints" / "gemma-demo", "gemma2": ROOT / "checkpoints" / "gemma2-demo"}
TOKENS = torch.tensor([[2, 651, 3037, 9, 4095, 17]])  # ids < the demos' vocabulary of 4096
FILES = {"ckpt": "model.ckpt", "gguf": "model.gguf"}  # the bases that are one file, not a directory
SECONDS = 5  # per case: the demos load in ~0.05 s; a loader that spins takes minutes

# Values a config field is set to: wrong types, out of range, boundaries.
WRONG_TYPES = ["4096", "1e-6", True, None, [1], {"a": 1}, 2.5]
OUT_OF_RANGE = [0, -1, -5, float("nan"), float("inf"), -0.0, 10**6, 10**12]
BOUNDARIES = [1, 2, 1e-12, 1e30]
FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
          "pad_token_id", "eos_token_id", "bos_token_id"]
FIELDS2 = ["query_pre_attn_scalar", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping"]
SPECIAL = {  # fields whose values are not numbers
    "model_type": ["llama", 5, None, "gemma3", ["gemma"]],
    "architectures": [["GemmaForSequenceClassification"], "GemmaForCausalLM", [5], [], None, {"a": 1}],
    "hidden_activation": ["silu", "gelu", 5, ["gelu"]],
    "rope_parameters": [{"rope_type": "linear", "factor": 2.0}, {"rope_theta": 500.0}, "default", [1], {"rope_theta": "x"}],
    "layer_types": [["bogus"] * 4, ["full_attention"] * 3, "sliding_attention", None, ["full_attention"] * 4, [1, 2, 3, 4]],
    "eos_token_id": [[1, 107], [-1], "1"],
    "id2label": [{"0": "a"}, "x", []],
}


ORIGINAL = {family: json.loads((path / "config.json").read_text()) for family, path in DEMOS.items()}
SHAPED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"]


def valid(family, field, value):
    """Whether the demo of `family`, with `field` of config.json set to `value`, is a
    valid checkpoint: the specification the loader is held to, written out apart
    from the config classes' own checks."""
    number = type(value) in (int, float) and 0 < value < math.inf  # not bool, not NaN
    if field in SHAPED:  # the tensors fix them
        return type(value) is int and value == ORIGINAL[family][field]
    if field in ("max_position_embeddings", "sliding_window"):
        return type(value) is int and value >= 1
    if field in ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar"):
        return number
    if field.endswith("softcapping"):
        return value is None or number
    if field.endswith("token_id"):  # None, an id in the vocabulary, or a list of them
        return value is None or all(type(i) is int and 0 <= i < 4096 for i in (value if type(value) is list else [value]))
    if field == "layer_types":  # Gemma 1 has none and ignores the key
        kinds = ("sliding_attention", "full_attention")
        return family == "gemma" or value is None or type(value) is list and len(value) == 4 and all(t in kinds for t in value)
    return {"model_type": value == family, "architectures": value in ([], None), "id2label": True,  # a causal LM has no labels
            "hidden_activation": value in ("gelu", "gelu_pytorch_tanh"),
            "rope_parameters": value == {"rope_theta": 500.0}}[field]


# Files


def header_and_data(file):
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(file, header_bytes, data):
    file.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)


def edit_json(file, change):
    """change(value) edits the parsed JSON in place; what it returns is ignored."""
    value = json.loads(file.read_text())
    change(value)
    file.write_text(json.dumps(value))


def set_field(field, value):
    return lambda d: d.__setitem__(field, value)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The checkpoints the cases start from: copies of both demos, a sharded copy of
    each, and an official .ckpt (with the demo's config.json beside it)."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for family, demo in DEMOS.items():
        out[family] = root / family
        shutil.copytree(demo, out[family])
        model = weights.load(demo, device="cpu", progress=False)
        out[family + "-sharded"] = root / (family + "-sharded")
        weights.save_hf(model, out[family + "-sharded"], max_shard_bytes=1 << 20)
        assert len(list(out[family + "-sharded"].glob("*.safetensors"))) > 2
    out["ckpt"] = root / "official"
    out["ckpt"].mkdir()
    model = weights.load(DEMOS["gemma2"], device="cpu", progress=False)
    torch.save({"model_state_dict": official_state_dict(model.state_dict(), model.config)}, out["ckpt"] / "model.ckpt")
    shutil.copy(DEMOS["gemma2"] / "config.json", out["ckpt"])
    out["gguf"] = root / "gguf"
    out["gguf"].mkdir()
    write_gguf(out["gguf"] / "model.gguf", "gemma2", gguf_demo(), Q.Q8_0, tokenizer=DEMOS["gemma2"] / "tokenizer.model")
    return out


def gguf_demo(cache={}):
    """The Gemma 2 demo as transformers holds it, for writing GGUF variants of it."""
    if not cache:
        cache["model"] = transformers.AutoModelForCausalLM.from_pretrained(DEMOS["gemma2"], dtype=torch.float32)
    return cache["model"]


# The cases: (name, base, mutate(checkpoint path)); mutate edits the copy. A name
# marked "(valid)" must load; "(either)" may load or be refused; any other must be refused.


def config_cases(rng):
    cases = []
    for family in ["gemma", "gemma2"]:
        for field in FIELDS + (FIELDS2 if family == "gemma2" else []):
            for value in rng.sample(WRONG_TYPES, 2) + rng.sample(OUT_OF_RANGE, 2) + rng.sample(BOUNDARIES, 1):
                cases.append((f"{family} config {field}={value!r}", family, valid(family, field, value), set_field(field, value)))
        for field, values in SPECIAL.items():
            for value in values:
                cases.append((f"{family} config {field}={value!r}", family, valid(family, field, value), set_field(field, value)))
        cases.append((f"{family} config without hidden_size", family, False, lambda d: d.pop("hidden_size")))
    return [(name + " (valid)" * ok, base, lambda p, c=change: edit_json(p / "config.json", c)) for name, base, ok, change in cases]


def raw_config_cases():
    texts = {"not JSON": "{hidden_size: 5", "empty": "", "a list": "[]", "null": "null", "an empty object": "{}", "deeply nested": "[" * 100000 + "]" * 100000,
             "a huge int": '{"model_type": "gemma", "hidden_size": 1' + "0" * 5000 + "}", "not UTF-8": "\udcff"}
    return [(f"gemma config {name}", "gemma",
             lambda p, t=text: (p / "config.json").write_bytes(t.encode("utf-8", "surrogateescape"))) for name, text in texts.items()]


def header_cases(rng):
    """Mutations of one entry of model.safetensors' header (a tensor drawn by rng), and of its framing."""
    def entry(change):
        def mutate(p):
            header, data = header_and_data(p / "model.safetensors")
            names = sorted(n for n in header if n != "__metadata__")
            name = rng.choice(names)
            change(header, name, names)
            write_raw(p / "model.safetensors", json.dumps(header).encode(), data)
        return mutate

    def offsets(f):
        return entry(lambda h, n, names: h[n].__setitem__("data_offsets", f(*h[n]["data_offsets"])))

    def overlap(h, n, names):  # this tensor's bytes start inside the previous one's
        begin, end = h[n]["data_offsets"]
        h[n]["data_offsets"] = [max(begin - 4, 0), end - 4] if begin else [4, end + 4]

    def duplicate(p):  # the same name twice in the JSON text
        header, data = header_and_data(p / "model.safetensors")
        text = json.dumps(header)
        name = rng.choice(sorted(n for n in header if n != "__metadata__"))
        first = json.dumps({name: header[name]})[1:-1]
        write_raw(p / "model.safetensors", ("{" + first + "," + text[1:]).encode(), data)

    def framing(change):
        def mutate(p):
            raw = (p / "model.safetensors").read_bytes()
            (p / "model.safetensors").write_bytes(change(raw))
        return mutate

    def header_length(delta):
        return framing(lambda raw: (int.from_bytes(raw[:8], "little") + delta).to_bytes(8, "little") + raw[8:])

    def pad_header(raw):  # spaces after the JSON: a valid file, the data shifted
        n = int.from_bytes(raw[:8], "little")
        return (n + 64).to_bytes(8, "little") + raw[8 : 8 + n] + b" " * 64 + raw[8 + n :]

    mutations = {
        "offsets negative": offsets(lambda b, e: [b - 8, e - 8] if b else [-8, e]),
        "offsets as strings": offsets(lambda b, e: [str(b), str(e)]),
        "offsets swapped": offsets(lambda b, e: [e, b]),
        "offsets one short": offsets(lambda b, e: [b, e - 1]),
        "offsets past the end": offsets(lambda b, e: [b + 10**9, e + 10**9]),
        "offsets one number": offsets(lambda b, e: [b]),
        "offsets null": offsets(lambda b, e: None),
        "offsets floats": offsets(lambda b, e: [float(b), float(e)]),
        "offsets overlap": entry(overlap),
        "shape transposed": entry(lambda h, n, names: h[n].__setitem__("shape", h[n]["shape"][::-1] + [1])),
        "shape wrong": entry(lambda h, n, names: h[n].__setitem__("shape", [h[n]["shape"][0] + 1] + h[n]["shape"][1:])),
        "shape negative": entry(lambda h, n, names: h[n].__setitem__("shape", [-1])),
        "shape a string": entry(lambda h, n, names: h[n].__setitem__("shape", "32")),
        "dtype I32": entry(lambda h, n, names: h[n].__setitem__("dtype", "I32")),
        "dtype F16": entry(lambda h, n, names: h[n].__setitem__("dtype", "F16")),
        "dtype unknown": entry(lambda h, n, names: h[n].__setitem__("dtype", "F33")),
        "dtype a number": entry(lambda h, n, names: h[n].__setitem__("dtype", 4)),
        "entry removed": entry(lambda h, n, names: h.pop(n)),
        "entry renamed": entry(lambda h, n, names: h.__setitem__(n + ".extra", h.pop(n))),
        "entry a list": entry(lambda h, n, names: h.__setitem__(n, [1, 2])),
        "entry missing dtype": entry(lambda h, n, names: h[n].pop("dtype")),
        "metadata not strings": entry(lambda h, n, names: h.__setitem__("__metadata__", {"format": 1})),
        "metadata added (valid)": entry(lambda h, n, names: h.__setitem__("__metadata__", {"format": "pt", "x": "y"})),
        "name twice": duplicate,
        "header length +1": header_length(1),
        "header length -1": header_length(-1),
        "header length huge": header_length(10**15),
        "header length zero": framing(lambda raw: bytes(8) + raw[8:]),
        "header a list": framing(lambda raw: (2).to_bytes(8, "little") + b"[]" + raw[8 + int.from_bytes(raw[:8], "little"):]),
        "header not JSON": framing(lambda raw: raw[:8] + b"\xff" + raw[9:]),
        "header padded (valid)": framing(pad_header),
        "empty file": framing(lambda raw: b""),
        "7 bytes": framing(lambda raw: raw[:7]),
        "padded 1 byte": framing(lambda raw: raw + b"\0"),
        "padded 4096 bytes": framing(lambda raw: raw + bytes(4096)),
    }
    cases = []
    for family in ["gemma", "gemma2"]:
        for name, mutate in mutations.items():
            cases.append((f"{family} safetensors {name}", family, mutate))
        for cut in sorted(rng.sample(range(8, 5_900_000), 4)):
            cases.append((f"{family} safetensors cut at {cut}", family, framing(lambda raw, c=cut: raw[:c])))
    return cases


def index_cases(rng):
    index = "model.safetensors.index.json"

    def shard(name_of):
        def mutate(p):
            d = json.loads((p / index).read_text())
            tensor = rng.choice(sorted(d["weight_map"]))
            d["weight_map"][tensor] = name_of(p, d["weight_map"][tensor])
            (p / index).write_text(json.dumps(d))
        return mutate

    def outside(p, shard_name):  # a valid copy of the shard, outside the checkpoint
        shutil.copy(p / shard_name, p.parent / "outside.safetensors")
        return "../outside.safetensors"

    def absolute(p, shard_name):
        return str((p / shard_name).resolve())

    def in_subdirectory(p, shard_name):
        (p / "sub").mkdir(exist_ok=True)
        shutil.copy(p / shard_name, p / "sub" / shard_name)
        return "sub/" + shard_name

    mutations = {
        "shard ../outside": shard(outside),
        "shard absolute path": shard(absolute),
        "shard in a subdirectory": shard(in_subdirectory),
        "shard name empty": shard(lambda p, s: ""),
        "shard name ..": shard(lambda p, s: ".."),
        "shard name a number": shard(lambda p, s: 5),
        "shard name null": shard(lambda p, s: None),
        "shard missing": shard(lambda p, s: "model-00009-of-00009.safetensors"),
        "tensor in the wrong shard": shard(lambda p, s: sorted({*json.loads((p / index).read_text())["weight_map"].values()} - {s})[0]),
        "tensor not listed": lambda p: edit_json(p / index, lambda d: d["weight_map"].pop(sorted(d["weight_map"])[0])),
        "tensor listed, in no shard": lambda p: edit_json(p / index, lambda d: d["weight_map"].update({"model.extra.weight": sorted(d["weight_map"].values())[0]})),
        "no weight_map": lambda p: edit_json(p / index, lambda d: d.pop("weight_map")),
        "weight_map a list": lambda p: edit_json(p / index, lambda d: d.__setitem__("weight_map", [1])),
        "index a list": lambda p: (p / index).write_text("[]"),
        "index not JSON": lambda p: (p / index).write_text("{"),
        "metadata removed (valid)": lambda p: edit_json(p / index, lambda d: d.pop("metadata")),
        "a shard truncated": lambda p: [f.write_bytes(f.read_bytes()[:1000]) for f in sorted(p.glob("model-*.safetensors"))[:1]],
    }
    return [(f"{family}-sharded index {name}", family + "-sharded", mutate)
            for family in ["gemma", "gemma2"] for name, mutate in mutations.items()]


def ckpt_cases(rng):
    def state(change):
        def mutate(p):
            outer = torch.load(p / "model.ckpt", weights_only=True)
            change(outer["model_state_dict"], outer)  # in place
            torch.save(outer, p / "model.ckpt")
        return mutate

    def some(sd):
        return rng.choice(sorted(n for n in sd if n != "freqs_cis"))

    class RunsCode:  # unpickling it would create a file
        def __reduce__(self):
            return (os.system, ("touch /tmp/test_fuzz_pwned",))

    raw = lambda change: lambda p: (p / "model.ckpt").write_bytes(change((p / "model.ckpt").read_bytes()))  # noqa: E731
    mutations = {
        "tensor dropped": state(lambda sd, s: sd.pop(some(sd))),
        "tensor added": state(lambda sd, s: sd.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(3))),
        "tensor reshaped": state(lambda sd, s: sd.__setitem__(n := some(sd), sd[n].reshape(-1))),
        "tensor int64": state(lambda sd, s: sd.__setitem__(n := some(sd), sd[n].long())),
        "tensor float64 (valid)": state(lambda sd, s: sd.__setitem__(n := some(sd), sd[n].double())),
        "tensor bf16 (valid)": state(lambda sd, s: sd.__setitem__(n := some(sd), sd[n].bfloat16())),
        "freqs_cis dropped (valid)": state(lambda sd, s: sd.pop("freqs_cis")),
        "a string for a tensor": state(lambda sd, s: sd.__setitem__(some(sd), "x")),
        "an int key": state(lambda sd, s: sd.__setitem__(5, torch.zeros(1))),
        "layer number not a number": state(lambda sd, s: sd.__setitem__("model.layers.x.mlp.up_proj.weight", torch.zeros(1))),
        "qkv rows wrong": state(lambda sd, s: sd.__setitem__("model.layers.1.self_attn.qkv_proj.weight", torch.zeros(3, 128))),
        "embedder 1-D": state(lambda sd, s: sd.__setitem__("embedder.weight", torch.zeros(4096))),
        "no model_state_dict": state(lambda sd, s: s.__setitem__("state", s.pop("model_state_dict"))),
        "model_state_dict a list": state(lambda sd, s: s.__setitem__("model_state_dict", [1])),
        "a list": lambda p: torch.save([1, 2], p / "model.ckpt"),
        "a pickle that runs code": state(lambda sd, s: sd.__setitem__("embedder.weight", RunsCode())),
        "truncated": raw(lambda b: b[: len(b) // 2]),
        "garbage": raw(lambda b: bytes(rng.randrange(256) for _ in range(1000))),
        "empty": raw(lambda b: b""),
        "no config.json, no preset": lambda p: (p / "config.json").unlink(),
        "config.json hidden_size -5": lambda p: edit_json(p / "config.json", set_field("hidden_size", -5)),
        "config.json num_key_value_heads 1": lambda p: edit_json(p / "config.json", set_field("num_key_value_heads", 1)),
        "config.json num_hidden_layers 10**12": lambda p: edit_json(p / "config.json", set_field("num_hidden_layers", 10**12)),
    }
    return [(f"ckpt {name}", "ckpt", mutate)
            for name, mutate in mutations.items()]


def gguf_cases(rng):
    def rewrite(qtype=Q.Q8_0, **changes):  # the file written again, with changes (test_gguf.write_gguf)
        return lambda p: write_gguf(p / "model.gguf", "gemma2", gguf_demo(), qtype, tokenizer=DEMOS["gemma2"] / "tokenizer.model", **changes)

    def edit(change):  # the file edited in place, through the library's writable view of it
        def mutate(p):
            reader = gguf.GGUFReader(p / "model.gguf", "r+")
            change(reader, rng.choice(reader.tensors))
            del reader  # flushes and unmaps
        return mutate

    def metadata(key, value):
        return edit(lambda r, t: r.fields[key].parts[-1].__setitem__(0, value))

    raw = lambda change: lambda p: (p / "model.gguf").write_bytes(change((p / "model.gguf").read_bytes()))  # noqa: E731
    norm = "blk.1.attn_norm.weight"
    mutations = {
        "unknown architecture": rewrite(arch="llama"),
        "gemma3 architecture for gemma2 tensors": rewrite(arch="gemma3"),
        "a tensor missing": rewrite(skip=["model.layers.2.mlp.up_proj.weight"]),
        "a norm missing": rewrite(skip=["model.layers.1.input_layernorm.weight"]),
        "an unknown tensor": rewrite(extra=[("blk.0.attn_qkv.weight", np.zeros((4, 128), np.float32))]),
        "a misshapen tensor": rewrite(skip=["model.layers.1.input_layernorm.weight"], extra=[(norm, np.ones(64, np.float32))]),
        "an integer tensor": rewrite(skip=["model.layers.1.input_layernorm.weight"], extra=[(norm, np.ones(128, np.int32))]),
        "the tied output written out, equal (valid)": rewrite(Q.F32, extra=[("output.weight", gguf_demo().model.embed_tokens.weight.detach().numpy())]),
        "the output differing from the embedding": rewrite(extra=[("output.weight", np.zeros((4096, 128), np.float32))]),
        "block_count missing": rewrite(meta={"block_count": None}),
        "block_count 5": rewrite(meta={"block_count": 5}),
        "block_count a string": rewrite(meta={"block_count": "4"}),
        "embedding_length 256": rewrite(meta={"embedding_length": 256}),
        "feed_forward_length 256": rewrite(meta={"feed_forward_length": 256}),
        "head_count 8": rewrite(meta={"attention.head_count": 8}),
        "head_count 0": rewrite(meta={"attention.head_count": 0}),
        "head_count_kv 1": rewrite(meta={"attention.head_count_kv": 1}),
        "key_length 64": rewrite(meta={"attention.key_length": 64}),
        "value_length 16": rewrite(meta={"attention.value_length": 16}),
        "rms eps missing": rewrite(meta={"attention.layer_norm_rms_epsilon": None}),
        "rms eps negative": rewrite(meta={"attention.layer_norm_rms_epsilon": -1.0}),
        "sliding window 0": rewrite(meta={"attention.sliding_window": 0}),
        "caps missing (valid)": rewrite(meta={"attn_logit_softcapping": None, "final_logit_softcapping": None}),
        "block_count 10**9 in place": metadata("gemma2.block_count", 10**9),
        "context_length 0 in place": metadata("gemma2.context_length", 0),
        "a tensor's data past the end": edit(lambda r, t: t.field.parts[-1].__setitem__(0, 1 << 40)),
        "a tensor's offset unaligned": edit(lambda r, t: t.field.parts[-1].__setitem__(0, t.field.parts[-1][0] + 1)),
        "a tensor's type unknown": edit(lambda r, t: t.field.parts[-2].__setitem__(0, 99)),
        "a tensor's type F16 for F32 data": edit(lambda r, t: t.field.parts[-2].__setitem__(0, 1)),
        "a tensor's dims doubled": edit(lambda r, t: t.field.parts[3].__setitem__(0, t.field.parts[3][0] * 2)),
        "a tensor's dims 2**40": edit(lambda r, t: t.field.parts[3].__setitem__(0, 1 << 40)),
        "magic wrong": raw(lambda b: b"GGUX" + b[4:]),
        "version 99": raw(lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:]),
        "header only": raw(lambda b: b[:24]),
        "truncated in the metadata": raw(lambda b: b[:5000]),
        "padded (valid)": raw(lambda b: b + b"\0" * 64),
        "empty": raw(lambda b: b""),
    }
    for i, cut in enumerate(sorted(rng.random() for _ in range(8))):  # header, metadata, tensor list, data
        mutations[f"truncated at {cut:.0%} #{i}"] = raw(lambda b, cut=cut: b[: max(8, int(cut * len(b)))])
    for i, at in enumerate(sorted(rng.random() for _ in range(6))):
        mutations[f"a byte flipped at {at:.0%} #{i} (either)"] = raw(lambda b, at=at: b[: int(at * len(b))] + bytes([b[int(at * len(b))] ^ 0xFF]) + b[int(at * len(b)) + 1 :])
    def element(key, i, value):  # an array's element i: the part field.data points to
        return edit(lambda r, t: r.fields[key].parts[r.fields[key].data[i]].__setitem__(0, value))

    tokenizer = {
        "bos id out of range": metadata("tokenizer.ggml.bos_token_id", 10**6),
        "a token type unknown": element("tokenizer.ggml.token_type", 7, 9),
        "not SentencePiece": edit(lambda r, t: r.fields["tokenizer.ggml.model"].parts[-1].__setitem__(slice(None), np.frombuffer(b"bpe00", np.uint8))),
        "unchanged (valid)": lambda p: None,
    }
    return ([(f"gguf {name}", "gguf", mutate) for name, mutate in mutations.items()]
            + [(f"gguf tokenizer {name}", "gguf", mutate) for name, mutate in tokenizer.items()])


def tokenizer_cases(rng):
    def raw(change):
        return lambda p: (p / "tokenizer.model").write_bytes(change((p / "tokenizer.model").read_bytes()))
    mutations = {
        "truncated": raw(lambda b: b[: len(b) // 3]),
        "empty": raw(lambda b: b""),
        "garbage": raw(lambda b: bytes(rng.randrange(256) for _ in range(len(b)))),
        "a byte flipped (either)": raw(lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:]),
        "padded": raw(lambda b: b + b"\0" * 100),
        "unchanged (valid)": raw(lambda b: b),
    }
    return [(f"gemma tokenizer {name}", "gemma", mutate) for name, mutate in mutations.items()]


def all_cases():
    rng = random.Random(11)  # seeded: the same cases, in the same order, every run
    return (config_cases(rng) + raw_config_cases() + header_cases(rng) + index_cases(rng) + ckpt_cases(rng)
            + gguf_cases(rng) + tokenizer_cases(rng))


def outcome(path, tokenizer):
    """"loaded" or "refused", or an AssertionError saying what went wrong. A refusal
    must name a file of the checkpoint: the mutated one, or the one it disagrees with."""
    try:
        if tokenizer:
            weights.load_tokenizer(path).encode("a test")
            return "loaded"
        model = weights.load(path, device="cpu", progress=False)
    except weights.CheckpointError as e:
        message = str(e)
        directory = path if path.is_dir() else path.parent
        assert f"{directory}/" in message, f"the message names no file in {directory}: {message}"
        return "refused"
    with torch.no_grad():
        logits = model(TOKENS)
    assert torch.isfinite(logits).all(), "loaded, and the logits are not finite"
    return "loaded"


def test_every_mutated_checkpoint_is_refused_naming_its_file_or_if_valid_loads_a_finite_model(bases, tmp_path, capsys):
    cases = all_cases()
    assert len(cases) >= 100
    counts, failures = Counter(), []
    for i, (name, base, mutate) in enumerate(cases):
        work = tmp_path / str(i)
        work.mkdir()
        copy = work / "checkpoint"
        shutil.copytree(bases[base], copy)
        mutate(copy)
        path = copy / FILES[base] if base in FILES else copy
        start = time.perf_counter()
        try:
            result = outcome(path, tokenizer="tokenizer" in name)
        except AssertionError as e:
            result, why = "wrong", str(e)
        except Exception as e:  # noqa: BLE001  any other exception type is a failure
            result, why = "other exception", f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        if seconds > SECONDS:
            result, why = "too slow", f"{seconds:.1f} s"
        expected = "loaded" if "(valid)" in name else result if "(either)" in name else "refused"
        if result in ("loaded", "refused") and result != expected:
            result, why = "wrong", f"{result}, expected {expected}"
        counts[result] += 1
        if result not in ("loaded", "refused"):
            failures.append(f"{name}: {result}: {why}"[:400])
        shutil.rmtree(work)
    assert not Path("/tmp/test_fuzz_pwned").exists(), "a pickle ran code"
    with capsys.disabled():
        print(f"\nfuzz: {len(cases)} mutated checkpoints: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert not failures, "\n".join(failures)
    assert counts["loaded"] >= 10 and counts["refused"] >= 100  # both kinds were tried


# The rows of issue 11's table


@pytest.fixture
def demo(tmp_path, request):
    copy = tmp_path / "demo"
    shutil.copytree(DEMOS[getattr(request, "param", "gemma2")], copy)
    return copy


def refused(path, *fragments):
    with pytest.raises(weights.CheckpointError) as info:
        weights.load(path, device="cpu", progress=False)
    for fragment in fragments:
        assert str(fragment) in str(info.value)
    return str(info.value)


def with_entry(file, change):
    header, data = header_and_data(file)
    change(header)
    write_raw(file, json.dumps(header).encode(), data)


def test_negative_data_offsets_are_refused_naming_file_and_tensor(demo):
    file = demo / "model.safetensors"
    with_entry(file, lambda h: h["model.norm.weight"].__setitem__("data_offsets", [-8, h["model.norm.weight"]["data_offsets"][1] - 8]))
    refused(demo, file, "model.norm.weight")


def test_overlapping_tensors_are_refused_naming_file_and_tensor(demo):
    file = demo / "model.safetensors"
    header, _ = header_and_data(file)
    name = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])  # the last
    with_entry(file, lambda h: h[name].__setitem__("data_offsets", [h[name]["data_offsets"][0] - 4, h[name]["data_offsets"][1] - 4]))
    refused(demo, file, name)


def test_data_offsets_as_strings_are_refused_naming_file_and_tensor(demo):
    file = demo / "model.safetensors"
    with_entry(file, lambda h: h["model.norm.weight"].__setitem__("data_offsets", [str(x) for x in h["model.norm.weight"]["data_offsets"]]))
    refused(demo, file, "model.norm.weight")


@pytest.mark.parametrize("field, value", [("hidden_size", -5), ("vocab_size", "4096"), ("sliding_window", 0),
                                          ("rms_norm_eps", "1e-6"), ("layer_types", ["sliding_attention", "full_attention", "local", "full_attention"]),
                                          ("rope_theta", 0), ("max_position_embeddings", 0), ("final_logit_softcapping", 0)])
def test_config_value_out_of_type_or_range_is_refused_naming_config_json_and_the_field(demo, field, value):
    edit_json(demo / "config.json", set_field(field, value))
    refused(demo, demo / "config.json", field)
    with pytest.raises(ValueError, match=field):  # the config class itself refuses it, naming the field
        gemma2.Gemma2Config.from_hf({**json.loads((DEMOS["gemma2"] / "config.json").read_text()), field: value})


def test_a_million_layers_in_config_json_is_refused_at_once(demo):
    edit_json(demo / "config.json", set_field("num_hidden_layers", 1000000))
    start = time.perf_counter()
    refused(demo, demo / "config.json", "num_hidden_layers", "1000000")
    assert time.perf_counter() - start < 1


def test_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path, load_fails_reading_nothing):
    model = weights.load(DEMOS["gemma"], device="cpu", progress=False)
    weights.save_hf(model, tmp_path / "sharded", max_shard_bytes=1 << 20)
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.norm.weight"]
    shutil.copy(tmp_path / "sharded" / shard, tmp_path / "outside.safetensors")  # a valid file: reading it would work
    index["weight_map"] = {n: "../outside.safetensors" if s == shard else s for n, s in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    load_fails_reading_nothing(tmp_path / "sharded", index_path, "'../outside.safetensors'")


@pytest.fixture
def load_fails_reading_nothing(monkeypatch):
    opened = []
    read_safetensors = hf_format.read_safetensors
    monkeypatch.setattr(hf_format, "read_safetensors", lambda path: opened.append(path) or read_safetensors(path))

    def check(path, *fragments):
        opened.clear()
        refused(path, *fragments)
        assert all(p.parent == path for p in opened), opened  # nothing outside was opened

    return check


@pytest.fixture(scope="module")
def model():
    return gemma2.Gemma2ForCausalLM(gemma2.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                        max_position_embeddings=32, sliding_window=4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=1.0, top_k=0), "top_k"), (dict(temperature=1.0, top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(max_new_tokens="4"), "max_new_tokens"), (dict(max_new_tokens=None), "max_new_tokens"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p"), (dict(top_p="0.5"), "top_p"),
    (dict(stop_tokens=5), "stop_tokens"), (dict(stop_tokens=["1"]), "stop_tokens"), (dict(stop_tokens=None), "stop_tokens"),
    (dict(tokens=[2, 3.0]), "token ids"), (dict(tokens=[[2, 3], "ab"]), "token ids"), (dict(tokens=torch.tensor([2.0, 3.0])), "token ids"),
])
def test_generate_refuses_a_bad_argument_with_a_value_error_naming_it(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gemma2.generate(model, **(dict(tokens=[2, 3], max_new_tokens=4) | kwargs))


@pytest.mark.parametrize("module", [gemma, gemma2])
def test_generate_refuses_a_str_prompt_saying_to_tokenize_first(module):
    cfg = module.CONFIGS[next(iter(module.CONFIGS))]
    with torch.device("meta"):  # refused before any work: a meta model would fail at the first operation
        model = getattr(module, type(cfg).__name__.removesuffix("Config") + "ForCausalLM")(cfg)
    with pytest.raises(ValueError, match="tokenize"):
        module.generate(model, "Hello", 4)


@pytest.mark.parametrize("prompt", [
    [np.int64(2), np.int64(7), np.int32(9)], np.array([2, 7, 9]), torch.tensor([2, 7, 9]), (2, 7, 9),
    [torch.tensor(2), torch.tensor(7), torch.tensor(9)],
], ids=["numpy ints", "numpy array", "1-D tensor", "tuple", "0-d tensors"])
def test_generate_accepts_numpy_integers_and_integer_tensors_as_one_prompt(model, prompt):
    assert gemma2.generate(model, prompt, 5) == gemma2.generate(model, [2, 7, 9], 5)


@pytest.mark.parametrize("batch", [torch.tensor([[2, 7, 9], [2, 5, 6]]), np.array([[2, 7, 9], [2, 5, 6]]),
                                   [torch.tensor([2, 7, 9]), np.array([2, 5, 6])]], ids=["2-D tensor", "2-D array", "list of 1-D"])
def test_generate_accepts_a_2d_integer_tensor_as_a_batch(model, batch):
    assert gemma2.generate(model, batch, 5) == gemma2.generate(model, [[2, 7, 9], [2, 5, 6]], 5)


def test_every_config_field_is_checked_by_the_config_class_itself():
    # math.nan for each float, -1 for each int: each refused, naming the field.
    for config_class in [gemma.GemmaConfig, gemma2.Gemma2Config]:
        for field, default in vars(config_class()).items():
            if isinstance(default, list):
                continue
            bad = -1 if isinstance(default, int) else math.nan
            with pytest.raises(ValueError, match=field):
                config_class(**{field: bad})
