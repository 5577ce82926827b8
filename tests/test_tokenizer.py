"""tokenizer.py against transformers' GemmaTokenizer and the official chat template.

The tokenizer under test is the one shipped with the demo checkpoint: a small
SentencePiece model trained with Gemma's settings (scripts/train_demo.py), so
byte fallback, split digits, whitespace runs and the turn markers all occur.
"""

import pathlib

import pytest
import sentencepiece as spm

from tokenizer import Tokenizer

TOKENIZER_DIR = pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "gemma-demo"

# The official template of google/gemma-2-2b-it (the same in gemma-7b-it and
# gemma-2-9b-it), copied from the "chat_template" field of its
# tokenizer_config.json on the Hugging Face Hub
# (https://huggingface.co/google/gemma-2-2b-it/blob/main/tokenizer_config.json).
OFFICIAL_TEMPLATE = (
    r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    r"{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    r"{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

HARD_STRINGS = [
    "",
    " ",
    "   ",
    " leading space",
    "trailing space ",
    "two  spaces,   three,    four",
    "line\nbreak",
    "\n",
    "\n\n\nthree newlines first",
    "a\n\n\n\n\n\n\n\n\n\n\n\nb",  # a run longer than any newline piece
    "\r\n windows line end",
    "\ttab\t\tand tabs\t",
    "digits 0123456789 and 3.14159, 2024-11-25, 1e-6",
    "emoji 😀👍🏽 👨‍👩‍👧 (with a zero-width joiner)",
    "中文字符 and 日本語のテキスト and 한국어",
    "café naïve résumé Ωμέγα",
    "def f(x):\n    return [i ** 2 for i in range(x)]  # squares\n",
    "if __name__ == '__main__':\n\tmain()\n",
    "{'key': \"value\", 'n': None} >>> print(f'{x!r:>10}')",
    "the <start_of_turn> marker inside text, and <end_of_turn> too",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "Python’s “smart quotes” — and an ellipsis…",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What does the for statement do?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Explain list comprehensions."},
    ],
    [
        {"role": "user", "content": "  \n\tcontent that needs trimming \n\n"},
        {"role": "model", "content": "\n  both sides \t"},  # "model" accepted as the assistant's role
        {"role": "user", "content": "inner  spaces\n\nand newlines stay"},
        {"role": "assistant", "content": "\u00a0unicode whitespace is trimmed too\u3000"},
    ],
    [{"role": "user", "content": "code:\n```python\nprint('hi')\n```\n"}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "emoji 😀 and 中文 and digits 12345"}, {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER_DIR / "tokenizer.model")


@pytest.fixture(scope="module")
def hf():
    """transformers' tokenizer built the way that works in transformers 5.

    In transformers 5, GemmaTokenizer.__init__ takes a `vocab`, not a
    `vocab_file`: GemmaTokenizer(vocab_file=...) silently ignores the file and
    builds a vocabulary of the special tokens alone
    (transformers/models/gemma/tokenization_gemma.py). from_pretrained on the
    directory converts its tokenizer.model instead, through sentencepiece's
    protobuf schema (`convert_to_native_format` in
    transformers/tokenization_utils_tokenizers.py), hence the protobuf skip.
    """
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    from transformers import GemmaTokenizer

    return GemmaTokenizer.from_pretrained(TOKENIZER_DIR, add_bos_token=True)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_encode_ids_equal_transformers_gemma_tokenizer(tok, hf, text):
    assert tok.encode(text) == hf(text)["input_ids"]


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_encode_is_raw_sentencepiece_with_bos_prepended(tok, text):
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))
    assert tok.encode(text) == [tok.bos_id] + sp.encode(text)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_decode_round_trips_every_string(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=False, eos=True)) == text


def test_bos_and_eos_are_added_only_when_asked(tok):
    body = tok.encode("x = 1", bos=False)
    assert body[0] != tok.bos_id
    assert tok.encode("x = 1") == [tok.bos_id] + body
    assert tok.encode("x = 1", eos=True) == [tok.bos_id] + body + [tok.eos_id]


def test_special_ids_are_gemmas(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.sp.unk_id() == 3
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.sp.id_to_piece(tok.start_of_turn_id) == "<start_of_turn>"
    assert tok.sp.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"
    assert tok.vocab_size == tok.sp.get_piece_size() == 4096


def test_special_ids_agree_with_transformers(tok, hf):
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [tok.start_of_turn_id, tok.end_of_turn_id]
    # transformers adds a <mask> token of its own, one past the SentencePiece pieces.
    assert len(hf) == tok.vocab_size + 1


def test_turn_markers_encode_as_single_ids(tok):
    assert tok.encode("<start_of_turn>user\n", bos=False)[0] == tok.start_of_turn_id
    assert tok.encode("<end_of_turn>", bos=False) == [tok.end_of_turn_id]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_format_chat_equals_official_template(tok, hf, messages, add_generation_prompt):
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=OFFICIAL_TEMPLATE
    )
    assert tok.format_chat(messages, add_generation_prompt) == expected


def test_format_chat_writes_the_documented_layout(tok):
    # Independent of transformers: the layout of "Gemma formatting and system
    # instructions" (https://ai.google.dev/gemma/docs/formatting), with <bos> first.
    messages = [{"role": "user", "content": " Hi \n"}, {"role": "assistant", "content": "Hello"}]
    assert tok.format_chat(messages) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.format_chat(messages[:1], add_generation_prompt=False) == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_encode_chat_equals_transformers_tokenized_template(tok, hf, messages, add_generation_prompt):
    expected = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, chat_template=OFFICIAL_TEMPLATE
    )["input_ids"]
    assert tok.encode_chat(messages, add_generation_prompt) == expected


def test_encode_chat_starts_with_one_bos_id_and_uses_turn_marker_ids(tok):
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[:2] == [tok.bos_id, tok.start_of_turn_id]
    assert ids.count(tok.bos_id) == 1
    assert ids.count(tok.end_of_turn_id) == 1
    assert ids.count(tok.start_of_turn_id) == 2  # the user turn and the generation prompt
    assert tok.decode(ids) == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late system turn"}],
    ],
)
def test_system_role_is_a_value_error(tok, messages):
    with pytest.raises(ValueError, match="system"):
        tok.format_chat(messages)
    with pytest.raises(ValueError, match="system"):
        tok.encode_chat(messages)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "I speak first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "model", "content": "c"}],
    ],
)
def test_roles_that_do_not_alternate_are_a_value_error(tok, messages):
    with pytest.raises(ValueError, match="alternate"):
        tok.format_chat(messages)


def test_official_template_also_rejects_what_format_chat_rejects(hf):
    # The oracle's side of the two tests above (jinja raises TemplateError).
    for messages in ([{"role": "system", "content": "x"}], [{"role": "assistant", "content": "x"}]):
        with pytest.raises(Exception, match="System role|alternate"):
            hf.apply_chat_template(messages, tokenize=False, chat_template=OFFICIAL_TEMPLATE)


def test_missing_tokenizer_file_error_names_the_file(tmp_path):
    path = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer(path)


def test_unreadable_tokenizer_file_error_names_the_file(tmp_path):
    path = tmp_path / "garbage.model"
    path.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.model"):
        Tokenizer(path)


def test_tokenizer_without_turn_markers_is_an_error(tmp_path):
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(["a tiny corpus with no chat markers at all"] * 20),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=300,  # byte fallback needs 256 byte pieces
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="<start_of_turn>"):
        Tokenizer(tmp_path / "plain.model")
