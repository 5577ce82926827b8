"""GGUF files written as llama.cpp's converter writes them, read back by weights.load.

Each test builds a tiny randomised transformers model, writes it the way
convert_hf_to_gguf.py does (github.com/ggml-org/llama.cpp at commit
a458664fc83b6513baea7adafcb0ef0626b006f8: the `gguf` library's writer and tensor
name map, norm weights written as w + 1, the same metadata keys), in F32, F16,
BF16, Q8_0 or Q4_0, and compares our logits with those of the transformers model
holding the same weights as the file (dequantized by the library, independently
of our reader). transformers reads no Gemma 1 GGUF, and keeps its defaults
where a Gemma 2 or 3 file says otherwise, so that model is the oracle; where
transformers reads a file in full, its own reading is compared too.
"""

from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece.sentencepiece_model_pb2 as sp_model
import torch
import transformers

import generate
import weights
from hf_oracle import hf_causal_lm, hf_logits

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}
Q = gguf.GGMLQuantizationType
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0]

# Tiny shapes, each a multiple of the 32-wide blocks of Q8_0 and Q4_0 where it is
# a row: MQA in Gemma 1, GQA in 2 and 3, head widths (24, 40) that are not
# hidden / heads, windows of 8 under 24-token sequences, Gemma 2's caps not
# llama.cpp's defaults of 50 and 30, Gemma 3's linear RoPE scaling.
V = 4098  # the Gemma 3 demo tokenizer's size; its pieces go into every file
FIELDS = {
    "gemma": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=24),
    "gemma2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24, sliding_window=8,
                   attn_logit_softcapping=20.0, final_logit_softcapping=10.0),
    "gemma3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=40, query_pre_attn_scalar=40, sliding_window=8,
                   rope_scaling={"rope_type": "linear", "factor": 8.0}),
}
TOKENS = torch.randint(4, V, (2, 24), generator=torch.Generator().manual_seed(1))
# Float32 on both sides, the same weights, the same ops: 1-2 ulp of logits of O(10).
ATOL = 2e-5
TOKENIZER = ROOT / "checkpoints" / "gemma3-demo" / "tokenizer.model"


def hf_model(family, **fields):
    base = dict(vocab_size=V, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return hf_causal_lm(family, **{**base, **FIELDS[family], **fields})


def tokenizer_arrays(tokenizer=TOKENIZER):
    """The tokenizer as the converter writes it (_create_vocab_sentencepiece): each
    piece with its score and type; the pieces Gemma's tokenizer_config.json lists
    as added tokens (here: the user-defined ones) as control tokens when they look
    special (<...>), else user-defined with U+2581 turned into a plain space."""
    proto = sp_model.ModelProto.FromString(tokenizer.read_bytes())
    P = proto.SentencePiece
    kinds = {P.NORMAL: 1, P.UNKNOWN: 2, P.CONTROL: 3, P.UNUSED: 5, P.BYTE: 6}
    pieces, scores, types = [], [], []
    for p in proto.pieces:
        piece, kind, score = p.piece, kinds.get(p.type), p.score
        if p.type == P.USER_DEFINED:
            special = piece.startswith("<") and piece.endswith(">")
            piece, kind, score = (piece if special else piece.replace("\u2581", " ")), (3 if special else 4), -1000.0
        pieces.append(piece), scores.append(score), types.append(kind)
    return pieces, scores, types


def write_gguf(path, family, model, qtype=Q.F32, meta=None, skip=(), extra=(), arch=None, tokenizer=TOKENIZER):
    """`model` written as convert_hf_to_gguf.py writes it; `meta` overrides metadata
    keys (None: leave out), `skip` leaves tensors out, `extra` adds (name, array),
    `arch` replaces the architecture's name."""
    c = model.config
    arch = arch or gguf.MODEL_ARCH_NAMES[ARCH[family]]
    w = gguf.GGUFWriter(path, arch)
    keys = {  # set_gguf_parameters of GemmaModel, Gemma2Model, Gemma3Model
        "context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
        "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": c.rms_norm_eps, "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
    }
    if family == "gemma2":
        keys.update({"attn_logit_softcapping": c.attn_logit_softcapping, "final_logit_softcapping": c.final_logit_softcapping,
                     "attention.sliding_window": c.sliding_window})
    if family == "gemma3":
        keys.update({"rope.freq_base": c.rope_parameters["full_attention"]["rope_theta"], "attention.sliding_window": c.sliding_window})
        scaling = c.rope_parameters["full_attention"]
        if scaling.get("rope_type") == "linear":
            keys.update({"rope.scaling.type": "linear", "rope.scaling.factor": scaling["factor"]})
    keys.update(meta or {})
    for key, value in keys.items():
        if value is not None:
            kind = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}[type(value)]
            w.add_key_value(f"{arch}.{key}", value, kind)
    pieces, scores, types = tokenizer_arrays(tokenizer)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces), w.add_token_scores(scores), w.add_token_types(types)
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_unk_token_id(3), w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    names = gguf.get_tensor_name_map(ARCH[family], c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" or name in skip:  # tied: the converter skips it
            continue
        data = t.float().numpy()
        if name.endswith("norm.weight"):
            data = data + 1  # llama.cpp's norm multiplies by w; Gemma's by (1 + w)
        gname = names.get_name(name, try_suffixes=(".weight",))
        if data.ndim == 2 and qtype != Q.F32:  # 1-D tensors stay F32, as the converter keeps them
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, data)
    for name, data in extra:
        w.add_tensor(name, data)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def as_in_file(model, qtype):
    """`model` with the weights the file holds: each matrix quantized and dequantized
    by the library, each norm weight through (w + 1) - 1 in float32."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            data = p.float().numpy()
            if name.endswith("norm.weight"):
                p.copy_(torch.from_numpy((data + 1).astype(np.float32) - 1))
            elif data.ndim == 2 and qtype != Q.F32:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)).view(p.shape))
    return model


def load(path, **kwargs):
    return weights.load(path, device="cpu", dtype=torch.float32, progress=False, **kwargs)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_logits_equal_transformers_holding_the_files_weights(tmp_path, family, qtype):
    model = hf_model(family)
    path = write_gguf(tmp_path / "model.gguf", family, model, qtype)
    ours = load(path)
    torch.testing.assert_close(ours(TOKENS), hf_logits(as_in_file(model, qtype), TOKENS), rtol=0, atol=ATOL)


def test_quantization_changed_the_weights_so_the_oracle_is_not_the_float_model(tmp_path):
    model = hf_model("gemma2")
    float_logits = hf_logits(model, TOKENS)
    ours = load(write_gguf(tmp_path / "model.gguf", "gemma2", model, Q.Q4_0))
    assert (ours(TOKENS) - float_logits).abs().max() > 100 * ATOL


def test_gemma2_caps_and_window_come_from_the_metadata(tmp_path):
    model = hf_model("gemma2")
    c = load(write_gguf(tmp_path / "model.gguf", "gemma2", model)).config
    assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.sliding_window) == (20.0, 10.0, 8)
    # Without the keys, llama.cpp's defaults (llama-hparams.h): 50, 30 and 4096.
    meta = {"attn_logit_softcapping": None, "final_logit_softcapping": None, "attention.sliding_window": None}
    c = load(write_gguf(tmp_path / "bare.gguf", "gemma2", model, meta=meta)).config
    assert (c.attn_logit_softcapping, c.final_logit_softcapping, c.sliding_window) == (50.0, 30.0, 4096)


@pytest.mark.parametrize("family, layers", [("gemma2", 46), ("gemma3", 62)])
def test_the_27b_layer_count_gets_llama_cpps_query_scale_hidden_over_heads(tmp_path, family, layers):
    # gemma-2-27b and gemma-3-27b scale queries by 4608 / 32 = 144 and 5376 / 32 = 168,
    # not head_dim 128; the file does not say so, llama.cpp knows them by layer count.
    hidden_over_heads = FIELDS[family]["hidden_size"] // FIELDS[family]["num_attention_heads"]  # 16
    model = hf_model(family, num_hidden_layers=layers, query_pre_attn_scalar=hidden_over_heads)
    ours = load(write_gguf(tmp_path / "model.gguf", family, model))
    assert ours.config.query_pre_attn_scalar == hidden_over_heads != ours.config.head_dim
    torch.testing.assert_close(ours(TOKENS[:, :10]), hf_logits(model, TOKENS[:, :10]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_gemma3_equals_transformers_reading_the_same_file(tmp_path, qtype):
    # transformers keeps Gemma3TextConfig's defaults for what the file leaves to
    # llama.cpp's code: query scale 256 (so head_dim 256 here), no RoPE scaling.
    model = hf_model("gemma3", head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, rope_scaling=None)
    path = write_gguf(tmp_path / "model.gguf", "gemma3", model, qtype)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    torch.testing.assert_close(load(path)(TOKENS), hf_logits(theirs, TOKENS), rtol=0, atol=ATOL)


def test_transformers_ignores_gemma3s_rope_scaling_in_a_file_and_we_do_not(tmp_path):
    # What the README says of gemma-3-4b/12b/27b files: their factor-8 linear scaling
    # is in the metadata, and transformers' GGUF reader drops it.
    model = hf_model("gemma3", head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6)
    path = write_gguf(tmp_path / "model.gguf", "gemma3", model)
    ours = load(path)
    assert ours.config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    long = torch.randint(4, V, (1, 64), generator=torch.Generator().manual_seed(2))  # scaling shows with distance
    torch.testing.assert_close(ours(long), hf_logits(model, long), rtol=0, atol=ATOL)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    assert (hf_logits(theirs, long) - hf_logits(model, long)).abs().max() > 1e-3


def test_gemma3_without_a_window_is_all_global(tmp_path):
    model = hf_model("gemma3", layer_types=["full_attention"] * 7)  # its window goes unused
    ours = load(write_gguf(tmp_path / "model.gguf", "gemma3", model, meta={"attention.sliding_window": None}))
    assert set(ours.config.layer_types) == {"full_attention"}
    torch.testing.assert_close(ours(TOKENS), hf_logits(model, TOKENS), rtol=0, atol=ATOL)


STRINGS = ["Hello world", "  two\tspaces and a tab", "a" + " " * 12 + "b", "x" + " " * 40 + "y", "\n\n\nthree newlines\n",
           "<start_of_turn>user\nhi<end_of_turn>\n", "emoji 😀 and 中文", "def f(x):\n    return x  # id\n"]


def test_tokenizer_from_the_file_equals_the_sentencepiece_model_it_came_from(tmp_path):
    import sentencepiece

    path = write_gguf(tmp_path / "model.gguf", "gemma3", hf_model("gemma3"))
    ours = weights.load_tokenizer(path)
    original = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    for s in STRINGS:
        assert ours.encode(s, bos=False) == original.encode(s), s
        assert ours.decode(ours.encode(s)) == s
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.start_of_turn_id, ours.vocab_size) == (2, 1, 0, original.PieceToId("<start_of_turn>"), V)
    assert ours.format_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]).startswith("<bos><start_of_turn>user\ns\n\nu")


def test_convert_writes_a_directory_transformers_loads_with_the_same_logits(tmp_path):
    model = hf_model("gemma2")
    path = write_gguf(tmp_path / "model.gguf", "gemma2", model, Q.Q8_0)
    weights.main(["convert", str(path), str(tmp_path / "hf")])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    torch.testing.assert_close(hf_logits(theirs, TOKENS), load(path)(TOKENS), rtol=0, atol=ATOL)
    assert weights.load_tokenizer(tmp_path / "hf").encode(STRINGS[2]) == weights.load_tokenizer(path).encode(STRINGS[2])


@pytest.mark.parametrize("text", [["--prompt", "Hello"], ["--chat", "Hello"]])
def test_generate_py_runs_a_gguf_file(tmp_path, text, capsys):
    path = write_gguf(tmp_path / "model.gguf", "gemma3", hf_model("gemma3"), Q.Q8_0)
    generate.main(["--checkpoint", str(path), *text, "--max-new-tokens", "5", "--device", "cpu"])
    assert "decode: " in capsys.readouterr().err
