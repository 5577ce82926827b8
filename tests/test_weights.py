"""weights.py: both checkpoint formats load strictly, equal transformers, convert, and fail loudly.

Every transformers model here is tiny and has EVERY parameter randomised, norm
weights included (transformers initialises them to zero, which would hide a
norm read into the wrong place), is written to tmp_path and read back through
weights.load. Every test that builds a model runs for Gemma and for Gemma 2,
except where the claim does not depend on the family (the command line, memory).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors.torch import load_file, save_file

import gemma
import gemma2
import weights
from hf_oracle import OURS, hf_causal_lm, hf_classifier, hf_logits, our_config, our_state_dict

ROOT = Path(__file__).resolve().parents[1]
# Tiny, yet with what a loader can get wrong: grouped-query attention (4 query
# heads on 2 key/value heads, so q, k and v have different row counts), head_dim
# 16 != hidden 32 / 4 heads, and (Gemma 2) 3 layers, local-global-local, with
# sequences (12 tokens) longer than the sliding window (4).
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
FIELDS = {"gemma": SMALL, "gemma2": {**SMALL, "sliding_window": 4}}
TOKENS = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))  # no pad id (0)
# float32 on both sides, the same operations rounded in a different order: the
# logits reach about 30, where one float32 ulp is 3.8e-6; observed differences
# are 1-2 ulp, and a real bug (a wrong tensor, a missing norm) moves them by O(1).
ATOL = 2e-5


@pytest.fixture(params=["gemma", "gemma2"])
def family(request):
    return request.param


@pytest.fixture
def hf_model(family):
    return hf_causal_lm(family, **FIELDS[family])


@pytest.fixture
def hf_dir(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def load(path, **kwargs):
    return weights.load(path, device="cpu", progress=False, **kwargs)


def assert_same_model(model, hf_model, family):
    """`model` is our causal LM holding exactly the tensors of `hf_model`, and gives its logits."""
    assert type(model) is OURS[family][1]
    expected, got = our_state_dict(hf_model), model.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), hf_logits(hf_model, TOKENS), atol=ATOL, rtol=0)


def official_state_dict(hf_state_dict, config):
    """HF-named tensors in the layout of the official gemma_pytorch .ckpt (the inverse
    of transformers' convert_gemma_weights_to_hf.py): `embedder.weight`, q, k and v
    stacked on dim 0 into `qkv_proj`, and the complex64 RoPE table `freqs_cis` of shape
    (2 * max_position_embeddings, head_dim / 2). Works on meta tensors too."""
    sd = {}
    for name, t in hf_state_dict.items():
        prefix = name.removesuffix("q_proj.weight")
        if name == "model.embed_tokens.weight":
            sd["embedder.weight"] = t
        elif name.endswith("self_attn.q_proj.weight"):
            sd[prefix + "qkv_proj.weight"] = torch.cat([t, hf_state_dict[prefix + "k_proj.weight"], hf_state_dict[prefix + "v_proj.weight"]])
        elif not name.endswith(("k_proj.weight", "v_proj.weight", "lm_head.weight")):
            sd[name] = t
    H, device = config.head_dim, sd["embedder.weight"].device
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, H, 2, device=device).float() / H)
    angles = torch.outer(torch.arange(2 * config.max_position_embeddings, device=device).float(), inv_freq)
    sd["freqs_cis"] = torch.polar(torch.ones_like(angles), angles)  # (2 * positions, H / 2) complex64
    return sd


def write_ckpt(path, hf_model, **replace):
    """An official .ckpt of the tensors of hf_model, with entries of its state dict replaced."""
    sd = official_state_dict(our_state_dict(hf_model), our_config(hf_model.config.model_type, hf_model))
    torch.save({"model_state_dict": {**sd, **replace}}, path)
    return path


@pytest.fixture
def load_fails(monkeypatch):
    """load_fails(path, *fragments): weights.load raises a CheckpointError (or `error`) whose
    message holds every fragment, before any tensor was read into the model."""
    read = []
    materialize = weights.materialize
    monkeypatch.setattr(weights, "materialize", lambda *args: read.append(args) or materialize(*args))

    def check(path, *fragments, error=weights.CheckpointError):
        with pytest.raises(error) as info:
            load(path)
        for fragment in fragments:
            assert str(fragment) in str(info.value)
        assert not read, "tensors were read before the checkpoint was found bad"
        return str(info.value)

    return check


# The Hugging Face layout


def test_hf_single_file_loads_the_tensors_and_logits_of_transformers(family, hf_model, hf_dir):
    assert sorted(p.name for p in hf_dir.glob("*.safetensors")) == ["model.safetensors"]
    assert_same_model(load(hf_dir), hf_model, family)


def test_hf_sharded_checkpoint_loads_the_tensors_and_logits_of_transformers(family, hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_same_model(load(tmp_path), hf_model, family)


@pytest.mark.parametrize("kind", ["seq", "tok"])
def test_classifier_checkpoint_loads_as_our_head_and_gives_its_outputs(family, kind, tmp_path):
    hf = hf_classifier(family, kind, num_labels=3, **FIELDS[family])
    hf.save_pretrained(tmp_path)
    model = load(tmp_path)
    assert type(model) is OURS[family][2 if kind == "seq" else 3]
    tokens = TOKENS.clone()
    tokens[0, -3:] = hf.config.pad_token_id  # row 0 is right-padded: pooled at its 9th token
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, atol=ATOL, rtol=0)


def test_lm_head_equal_to_the_embedding_is_accepted(family, hf_model, hf_dir):
    file = hf_dir / "model.safetensors"
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    assert_same_model(load(hf_dir), hf_model, family)


def test_lm_head_different_from_the_embedding_is_rejected(hf_dir, load_fails):
    file = hf_dir / "model.safetensors"
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, file, metadata={"format": "pt"})
    load_fails(hf_dir, file, "lm_head.weight")


# dtype and device


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("asked, wanted", [(None, torch.float32), ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16), ("float32", torch.float32)])
def test_dtype_is_the_one_asked_for_and_float32_by_default_on_cpu(hf_model, tmp_path, stored, asked, wanted):
    hf_model.to(stored).save_pretrained(tmp_path)
    model = load(tmp_path, dtype=asked)
    # The values are the stored ones, cast once (an exact upcast, or a bf16 rounding).
    for name, p in model.state_dict().items():
        assert p.dtype == wanted and p.device.type == "cpu", name
        assert torch.equal(p, our_state_dict(hf_model)[name].to(wanted)), name
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_device_is_cuda_in_bf16_and_float32_on_request_matches_transformers(family, hf_model, hf_dir):
    model = weights.load(hf_dir, progress=False)  # device None, dtype None
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    for name, p in model.state_dict().items():
        assert p.device.type == "cuda" and p.dtype == want, name
        assert torch.equal(p.cpu(), our_state_dict(hf_model)[name].to(want)), name
    model = weights.load(hf_dir, device="cuda", dtype=torch.float32, progress=False)
    with torch.no_grad():  # float32, no TF32 (off by default); GPU kernels sum in other orders: a few ulp more
        torch.testing.assert_close(model(TOKENS.cuda()).cpu(), hf_logits(hf_model, TOKENS), atol=1e-4, rtol=0)


def test_unknown_dtype_name_is_an_error(hf_dir):
    with pytest.raises(ValueError, match="float64"):
        load(hf_dir, dtype="float64")


# The official gemma_pytorch .ckpt


def test_official_ckpt_with_config_json_beside_it_loads_and_matches(family, hf_model, tmp_path):
    ckpt = write_ckpt(tmp_path / "model.ckpt", hf_model)
    hf_model.config.to_json_file(tmp_path / "config.json")
    assert_same_model(load(ckpt), hf_model, family)


def test_official_ckpt_without_config_matching_no_preset_is_an_error(hf_model, tmp_path, load_fails):
    ckpt = write_ckpt(tmp_path / "model.ckpt", hf_model)
    load_fails(ckpt, ckpt, "match no", "config.json")


def test_official_ckpt_with_a_config_that_disagrees_names_the_fused_tensor(family, hf_model, tmp_path, load_fails):
    ckpt = write_ckpt(tmp_path / "model.ckpt", hf_model)
    hf_model.config.num_key_value_heads = 1
    hf_model.config.to_json_file(tmp_path / "config.json")
    load_fails(ckpt, ckpt, "model.layers.0.self_attn.qkv_proj.weight")


@pytest.mark.parametrize("preset", [*gemma.CONFIGS, *gemma2.CONFIGS])
def test_official_ckpt_shapes_of_each_preset_give_that_preset(preset, tmp_path):
    # A real checkpoint of these shapes is 5-110 GB; the preset is inferred from
    # shapes only, so meta tensors (shapes, no data) stand in for it.
    family, module = ("gemma", gemma) if preset in gemma.CONFIGS else ("gemma2", gemma2)
    cfg = module.CONFIGS[preset]
    with torch.device("meta"):
        model = OURS[family][1](cfg)
    sd = official_state_dict(model.state_dict(), cfg)
    config, source = weights.official_config(tmp_path / "model.ckpt", sd)  # no config.json in tmp_path
    assert config["model_type"] == family and source == tmp_path / "model.ckpt"
    assert type(cfg).from_hf(config) == cfg


# Convert: either format to a Hugging Face directory that transformers loads


def assert_transformers_reads_the_same_model(directory, hf_model, family):
    """transformers and weights.load both read `directory` as exactly `hf_model`."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    assert type(theirs) is type(hf_model)
    for name, t in hf_model.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], t), name
    # Same weights and the same config: transformers computes the same logits, bit for bit.
    assert torch.equal(hf_logits(theirs, TOKENS), hf_logits(hf_model, TOKENS))
    assert_same_model(load(directory), hf_model, family)


def official_dir(hf_model, directory):
    """An official .ckpt with a config.json and a tokenizer.model beside it."""
    directory.mkdir()
    write_ckpt(directory / "model.ckpt", hf_model)
    hf_model.config.to_json_file(directory / "config.json")
    (directory / "tokenizer.model").write_bytes(b"a stand-in: convert copies the file as it is")
    return directory


def test_convert_official_ckpt_to_sharded_hf_directory(family, hf_model, tmp_path):
    src, dst = official_dir(hf_model, tmp_path / "official"), tmp_path / "converted"
    weights.main(["convert", str(src / "model.ckpt"), str(dst), "--max-shard-size", "20KB"])
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((dst / s).is_file() for s in shards)
    assert not (dst / "model.safetensors").exists()
    assert (dst / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert_transformers_reads_the_same_model(dst, hf_model, family)


def test_convert_runs_as_a_command(tmp_path):
    hf_model = hf_causal_lm("gemma2", **FIELDS["gemma2"])
    src, dst = official_dir(hf_model, tmp_path / "official"), tmp_path / "converted"
    result = subprocess.run([sys.executable, str(ROOT / "weights.py"), "convert", str(src / "model.ckpt"), str(dst)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith(f"wrote {dst}\n")
    assert (dst / "tokenizer.model").is_file()
    assert_transformers_reads_the_same_model(dst, hf_model, "gemma2")


def test_convert_hf_directory_to_single_file(family, hf_model, hf_dir, tmp_path):
    dst = tmp_path / "converted"
    weights.main(["convert", str(hf_dir), str(dst)])
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]  # no tokenizer to copy
    assert_transformers_reads_the_same_model(dst, hf_model, family)


@pytest.mark.parametrize("stored, flag, written", [(torch.float32, [], torch.float32), (torch.bfloat16, [], torch.bfloat16), (torch.float32, ["--dtype", "bfloat16"], torch.bfloat16)])
def test_convert_keeps_the_stored_dtype_unless_told(hf_model, tmp_path, stored, flag, written):
    hf_model.to(stored).save_pretrained(tmp_path / "src")
    weights.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), *flag])
    assert {t.dtype for t in load_file(tmp_path / "dst" / "model.safetensors").values()} == {written}
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == str(written).removeprefix("torch.")


def test_save_hf_over_the_checkpoint_a_model_maps_keeps_both_intact(family, hf_model, hf_dir):
    model = load(hf_dir)  # float32 from float32: its tensors are views of model.safetensors
    # A new file renamed over the old one. Rewriting the old one in place would
    # destroy the checkpoint and pull the pages from under the model (SIGBUS).
    weights.save_hf(model, hf_dir)
    assert_same_model(model, hf_model, family)
    assert_same_model(load(hf_dir), hf_model, family)
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_convert_refuses_a_directory_that_is_not_empty(hf_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(SystemExit) as info:
        weights.main(["convert", str(hf_dir), str(dst)])
    assert str(dst) in str(info.value.code)
    assert (dst / "model.safetensors").read_bytes() == b"precious"


def test_convert_of_a_missing_checkpoint_exits_naming_it(tmp_path):
    with pytest.raises(SystemExit) as info:
        weights.main(["convert", str(tmp_path / "nowhere.ckpt"), str(tmp_path / "dst")])
    assert info.value.code.startswith(f"error: {tmp_path / 'nowhere.ckpt'}")  # printed, exit status 1
    assert not (tmp_path / "dst").exists()


# Bad input: a clear error naming the file (and the tensor), nothing half-loaded


def test_missing_path_is_file_not_found(tmp_path, load_fails):
    load_fails(tmp_path / "nowhere", tmp_path / "nowhere", error=FileNotFoundError)


def test_directory_without_config_json_is_an_error(hf_dir, load_fails):
    (hf_dir / "config.json").unlink()
    load_fails(hf_dir, hf_dir, "config.json")


@pytest.mark.parametrize("cut", ["in the data", "in the header", "in the length"])
def test_truncated_safetensors_is_an_error(hf_dir, cut, load_fails):
    file = hf_dir / "model.safetensors"
    data = file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    end = {"in the data": (header_end + len(data)) // 2, "in the header": header_end // 2, "in the length": 5}[cut]
    file.write_bytes(data[:end])
    message = load_fails(hf_dir, file, "refused by the safetensors library")
    if cut == "in the data":  # the tensor whose bytes are cut off is named
        header = json.loads(data[8:header_end])
        last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
        assert f"tensor {last}:" in message


def test_safetensors_header_whose_offsets_disagree_with_the_shape_is_an_error(hf_dir, load_fails):
    file = hf_dir / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [16]  # the offsets still span 32 floats
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # as long as before: the data stays put
    file.write_bytes(data[:8] + raw + data[8 + n :])
    load_fails(hf_dir, file, "model.norm.weight")


def test_truncated_official_ckpt_is_an_error(hf_model, tmp_path, load_fails):
    ckpt = write_ckpt(tmp_path / "model.ckpt", hf_model)
    hf_model.config.to_json_file(tmp_path / "config.json")
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    load_fails(ckpt, ckpt)


def rewrite(file, change):
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_an_error_naming_it(hf_dir, load_fails):
    rewrite(hf_dir / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    load_fails(hf_dir, hf_dir, "model.layers.1.mlp.up_proj.weight")


def test_tensor_missing_from_a_sharded_checkpoint_is_an_error_naming_it(hf_model, tmp_path, load_fails):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = tmp_path / index["weight_map"]["model.norm.weight"]
    rewrite(shard, lambda t: t.pop("model.norm.weight"))
    load_fails(tmp_path, shard, "model.norm.weight")


def test_unexpected_tensor_is_an_error_naming_it(hf_dir, load_fails):
    rewrite(hf_dir / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    load_fails(hf_dir, hf_dir / "model.safetensors", "model.layers.0.mlp.extra.weight")


def test_wrong_shaped_tensor_is_an_error_naming_it(hf_dir, load_fails):
    rewrite(hf_dir / "model.safetensors", lambda t: t.update({"model.norm.weight": torch.zeros(33)}))
    load_fails(hf_dir, hf_dir / "model.safetensors", "model.norm.weight", "(33,)", "(32,)")


def test_config_that_disagrees_with_the_tensors_is_an_error_naming_the_tensor(hf_dir, load_fails):
    config = json.loads((hf_dir / "config.json").read_text())
    config["num_key_value_heads"] = 1  # the file holds 2 key/value heads
    (hf_dir / "config.json").write_text(json.dumps(config))
    load_fails(hf_dir, hf_dir / "model.safetensors", "model.layers.0.self_attn.k_proj.weight")


def test_unknown_model_type_is_an_error(hf_dir, load_fails):
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "llama"
    (hf_dir / "config.json").write_text(json.dumps(config))
    load_fails(hf_dir, hf_dir / "config.json", "'llama'")


class RunsCode:
    """Unpickling this calls `function(*args)`: what a malicious checkpoint does."""

    def __init__(self, function, *args):
        self.call = (function, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("attack", ["os.system", "builtins.open"])
def test_ckpt_whose_pickle_would_run_code_is_refused_and_runs_nothing(hf_model, tmp_path, attack, load_fails):
    marker = tmp_path / "pwned"
    payload = RunsCode(os.system, f"touch {marker}") if attack == "os.system" else RunsCode(open, str(marker), "w")
    ckpt = write_ckpt(tmp_path / "model.ckpt", hf_model, **{"embedder.weight": payload})
    hf_model.config.to_json_file(tmp_path / "config.json")
    message = load_fails(ckpt, ckpt, "refused")
    assert not marker.exists()
    assert ("system" if attack == "os.system" else "open") in message
    # The payload is real: an unsafe unpickler would have run it.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


# What the user sees


def test_load_prints_one_summary_line_to_stderr(hf_dir, capsys):
    weights.load(hf_dir, device="cpu")
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"loaded {hf_dir}: 41,")  # 41,184 (Gemma) or 41,376 (Gemma 2) parameters
    assert "parameters, float32 on cpu, from 0.2 MB of tensors in " in err and err.count("\n") == 1
    weights.load(hf_dir, device="cpu", progress=False)
    assert capsys.readouterr() == ("", "")


# The tokenizer


def test_load_tokenizer_finds_tokenizer_model_in_a_directory_or_beside_a_file(tmp_path):
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(["a tiny corpus for a tokenizer"] * 20), model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=300, model_type="bpe", byte_fallback=True,  # 256 byte pieces, so 300
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    for path in [tmp_path, tmp_path / "model.ckpt"]:  # the .ckpt need not exist: only its folder is read
        tokenizer = weights.load_tokenizer(path)
        assert Path(tokenizer.path) == tmp_path / "tokenizer.model"
        assert tokenizer.decode(tokenizer.encode("a tiny corpus", bos=False)) == "a tiny corpus"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere" / "tokenizer.model")):
        weights.load_tokenizer(tmp_path / "elsewhere" / "model.ckpt")


# Memory


# A fresh interpreter, so that its memory is these loads' alone. The peak is
# Linux's VmHWM, the high-water mark of the process's resident set, reset to the
# current size just before each load (/proc/self/clear_refs). Not ru_maxrss:
# Linux carries the parent's resident set over fork and exec into the child's
# ru_maxrss, and the pytest process is bigger than these loads. Every parameter
# is read after the load: a tensor left in the mapped file becomes resident only
# when used, and the claim is about the model in use.
MEMORY_PROBE = r"""
import gc, json, re, sys
import torch, weights

def status(field):  # bytes, from /proc/self/status
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

torch.empty(1, device="meta").normal_()  # a one-off 75 MB: torch imports its meta kernels
for path in sys.argv[1:]:
    for dtype in ["float32", "bfloat16"]:
        gc.collect()
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        before = status("VmRSS")
        model = weights.load(path, device="cpu", dtype=dtype, progress=False)
        checksum = sum(float(p.sum()) for p in model.parameters())
        grew = status("VmHWM") - before
        print(json.dumps({"path": path, "dtype": dtype, "grew": grew, "model": sum(p.nbytes for p in model.parameters())}))
        del model
"""


@pytest.fixture(scope="module")
def float32_checkpoints(tmp_path_factory):
    """A 370 MB float32 Gemma model as a HF directory and as an official .ckpt in
    it (beside its config.json); what the bytes are does not matter here."""
    cfg = gemma.GemmaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=1, head_dim=128)
    with torch.device("meta"):
        model = gemma.GemmaForCausalLM(cfg)
    model.to_empty(device="cpu")  # uninitialised: fast, and any bytes will do
    directory = tmp_path_factory.mktemp("memory")
    weights.save_hf(model, directory)
    torch.save({"model_state_dict": official_state_dict(model.state_dict(), cfg)}, directory / "model.ckpt")
    return directory, directory / "model.ckpt"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_load_needs_little_more_memory_than_the_loaded_model(float32_checkpoints):
    file_bytes = float32_checkpoints[1].stat().st_size
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *map(str, float32_checkpoints)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    probes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(probes) == 4  # {HF directory, .ckpt} x {float32, bfloat16}
    for probe in probes:
        # A naive loader reads the whole file, then builds the model beside it:
        # 2x the file for float32, 1.5x converting to bfloat16. This one maps the
        # file and converts in 64 MB chunks, so it needs the model plus a little;
        # 64 MB of slack covers a chunk and the allocator's and interpreter's noise
        # (measured, both formats: float32 grows by the model + 3 MB, bfloat16 by the
        # model + 16 MB; without releasing the pages, bfloat16 grows by 3x the model).
        assert probe["grew"] < 1.1 * probe["model"] + 64e6, (probe, file_bytes)
