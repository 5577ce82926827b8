"""tokenizer.py on a Gemma 3 vocabulary against transformers and Gemma 3's official chat template.

The real tokenizer.model is a 33 MB download behind a licence, so the test
builds one with the same layout: the Gemma-style pieces of the demo tokenizer
(checkpoints/gemma-demo, scripts/train_demo.py) moved so that every special
piece sits at its id in Gemma 3's 262,144-piece vocabulary, and, as a control,
the same pieces at their ids in Gemma 2's 256,000-piece one (google-deepmind/gemma,
gemma/gm/text/_tokenizer.py: _Gemma3SpecialTokens and _Gemma2SpecialTokens):

                      Gemma 2   Gemma 3
    <pad> <eos> <bos> <unk>   0-3       0-3
    <mask>                    4         4
    <start_of_turn>           106       105
    <end_of_turn>             107       106
    <start_of_image>          255999    255999
    <end_of_image>            -         256000

Only the second vocabulary must get Gemma 3's chat template (a system message
folded into the first user turn); the first keeps Gemma 2's (a system message
is an error). The oracle is transformers' GemmaTokenizer with each official
template, exactly as the -it models ship it.
"""

import pathlib

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_model

from test_tokenizer import CONVERSATIONS, HARD_STRINGS, OFFICIAL_TEMPLATE as GEMMA2_TEMPLATE
from tokenizer import Tokenizer

BASE = pathlib.Path(__file__).resolve().parents[1] / "checkpoints" / "gemma-demo" / "tokenizer.model"

# google/gemma-3-4b-it, tokenizer_config.json, "chat_template" (a verbatim copy is
# vendored in linkedin/Liger-Kernel, test/resources/fake_configs/Google/Gemma3/
# gemma-3-4b-it/tokenizer_config.json), its JSON string decoded: the newlines
# inside the quoted '\n' strings are newlines in the file too.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

SYSTEM_CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}],
    [
        # The system text is not trimmed (the template adds it as it is, then "\n\n");
        # the user text after it is.
        {"role": "system", "content": "  Answer in French.\n"},
        {"role": "user", "content": "\tWhat does the for statement do? "},
        {"role": "assistant", "content": "Elle répète."},
        {"role": "user", "content": "Merci"},
    ],
    [{"role": "system", "content": ""}, {"role": "user", "content": "empty system text: a blank line"}],
    [{"role": "system", "content": "emoji 😀, 中文, digits 12345\n\n\n"}, {"role": "user", "content": "x"}],
    [{"role": "system", "content": "a system message and no turn: the template drops it"}],
]

Piece = sp_model.ModelProto.SentencePiece
SIZES = {"gemma2": 256000, "gemma3": 262144}
# (piece, id, type): their ids in each vocabulary, as in the module docstring.
SPECIALS = {
    "gemma2": [("<mask>", 4, Piece.CONTROL), ("<start_of_turn>", 106, Piece.USER_DEFINED),
               ("<end_of_turn>", 107, Piece.USER_DEFINED), ("<start_of_image>", 255999, Piece.USER_DEFINED)],
    "gemma3": [("<mask>", 4, Piece.CONTROL), ("<start_of_turn>", 105, Piece.USER_DEFINED),
               ("<end_of_turn>", 106, Piece.USER_DEFINED), ("<start_of_image>", 255999, Piece.USER_DEFINED),
               ("<end_of_image>", 256000, Piece.USER_DEFINED)],
}


def write_vocabulary(layout, path):
    """The demo tokenizer's pieces rearranged into the `layout` vocabulary, at `path`.

    Each special piece goes to its id; the demo's other pieces fill the ids from
    4 on, in their order (so the BPE merges and their scores are the demo's); the
    ids left over get filler pieces. The fillers are NORMAL pieces with the lowest
    score that no merge can build ("<filler...>" is no pair of demo pieces). The
    real vocabulary's reserved pieces (<unused0> ...) are special instead, but
    transformers turns every special piece into an added token, and 250,000 of
    those take it minutes to convert where this takes seconds.
    """
    proto = sp_model.ModelProto()
    proto.ParseFromString(BASE.read_bytes())
    specials = {name: (i, kind) for name, i, kind in SPECIALS[layout]}
    first_four, rest = list(proto.pieces[:4]), [p for p in proto.pieces[4:] if p.piece not in specials]
    assert [p.piece for p in first_four] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    lowest = min(p.score for p in rest)
    pieces = [None] * SIZES[layout]
    pieces[:4] = first_four
    for name, (i, kind) in specials.items():
        pieces[i] = Piece(piece=name, score=0.0, type=kind)
    free = (i for i in range(4, len(pieces)) if pieces[i] is None)
    for p in rest:
        pieces[next(free)] = p
    for i in free:
        pieces[i] = Piece(piece=f"<filler{i}>", score=lowest - 1, type=Piece.NORMAL)
    # The demo's user-defined symbols are listed in the trainer spec too; the
    # pieces are what SentencePiece reads.
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    path.write_bytes(proto.SerializeToString())


def build(layout, directory):
    """(ours, transformers' GemmaTokenizer) on the `layout` vocabulary written to `directory`.

    transformers' tokenizer is built as in test_tokenizer.py, the way that reads the
    file in transformers 5 (see transformers/models/gemma/tokenization_gemma.py).
    """
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    from transformers import GemmaTokenizer

    write_vocabulary(layout, directory / "tokenizer.model")
    return Tokenizer(directory / "tokenizer.model"), GemmaTokenizer.from_pretrained(directory, add_bos_token=True)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return build("gemma3", tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return build("gemma2", tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(params=["gemma3", "gemma2"])
def either(request):
    """(layout, ours, transformers', the layout's official template), for each layout."""
    template = {"gemma3": GEMMA3_TEMPLATE, "gemma2": GEMMA2_TEMPLATE}[request.param]
    return request.param, *request.getfixturevalue(request.param), template


def test_the_vocabularies_hold_the_released_ids(either):
    layout, tok, _, _ = either
    assert tok.vocab_size == SIZES[layout]
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.sp.unk_id()) == (0, 1, 2, 3)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == {"gemma3": (105, 106), "gemma2": (106, 107)}[layout]
    assert tok.sp.id_to_piece(255999) == "<start_of_image>"


def test_a_gemma_3_vocabulary_is_told_apart_by_its_end_of_image_piece_not_by_start_of_image(either):
    # Both vocabularies have <start_of_image> at 255999; only Gemma 3's has <end_of_image>.
    layout, tok, _, _ = either
    assert tok.is_gemma3 == (layout == "gemma3")


def test_the_demo_tokenizer_of_gemma_1_and_2_is_not_gemma_3():
    assert not Tokenizer(BASE).is_gemma3


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_encode_ids_equal_transformers_gemma_tokenizer(either, text):
    # The rearranged vocabularies still encode as transformers does (and round-trip),
    # so the chat tests below compare templates, not tokenizers.
    _, tok, hf, _ = either
    assert tok.encode(text) == hf(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_without_a_system_message_chat_equals_each_official_template(either, messages, add_generation_prompt):
    _, tok, hf, template = either
    kwargs = dict(add_generation_prompt=add_generation_prompt, chat_template=template)
    assert tok.format_chat(messages, add_generation_prompt) == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert tok.encode_chat(messages, add_generation_prompt) == hf.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_without_a_system_message_the_gemma_3_template_writes_what_the_gemma_2_template_writes(gemma3, messages):
    # The two templates differ in the system message only, so the demos of all three
    # families chat alike.
    _, hf = gemma3
    gemma2_text = hf.apply_chat_template(messages, tokenize=False, chat_template=GEMMA2_TEMPLATE)
    assert hf.apply_chat_template(messages, tokenize=False, chat_template=GEMMA3_TEMPLATE) == gemma2_text


@pytest.mark.parametrize("messages", SYSTEM_CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_3_folds_a_system_message_into_the_first_user_turn_as_its_template_does(gemma3, messages, add_generation_prompt):
    tok, hf = gemma3
    kwargs = dict(add_generation_prompt=add_generation_prompt, chat_template=GEMMA3_TEMPLATE)
    assert tok.format_chat(messages, add_generation_prompt) == hf.apply_chat_template(messages, tokenize=False, **kwargs)
    assert tok.encode_chat(messages, add_generation_prompt) == hf.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]


def test_gemma_3_chat_writes_the_documented_layout(gemma3):
    # Independent of transformers: the layout in tokenizer.py's docstring.
    tok, _ = gemma3
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": " Hi \n"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = (
        "<bos><start_of_turn>user\nBe brief. \n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.format_chat(messages) == text
    ids = tok.encode_chat(messages)
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # <bos> once, then <start_of_turn>
    assert [i for i in ids if i in (105, 106)] == [105, 106] * 3 + [105]  # the turn markers as ids
    assert tok.decode(ids) == text.removeprefix("<bos>")


def test_a_system_message_is_an_error_for_gemma_1_and_2_as_in_their_template(gemma2):
    tok, hf = gemma2
    messages = SYSTEM_CONVERSATIONS[0]
    with pytest.raises(ValueError, match="system"):
        tok.format_chat(messages)
    with pytest.raises(Exception, match="System role"):  # the template's own error
        hf.apply_chat_template(messages, tokenize=False, chat_template=GEMMA2_TEMPLATE)


@pytest.mark.parametrize(
    "messages",
    [
        # At an even place of the turns Gemma 3's template raises "must alternate"; at
        # an odd one it writes a "<start_of_turn>system" turn, which no Gemma model
        # was trained on: format_chat refuses both.
        [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}, {"role": "system", "content": "late"}],
        [{"role": "user", "content": "Hi"}, {"role": "system", "content": "late"}],
        [{"role": "system", "content": "one"}, {"role": "system", "content": "two"}, {"role": "user", "content": "Hi"}],
    ],
)
def test_a_system_message_after_the_first_is_a_value_error(either, messages):
    _, tok, _, _ = either
    with pytest.raises(ValueError, match="system"):
        tok.format_chat(messages)
    with pytest.raises(ValueError, match="system"):
        tok.encode_chat(messages)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "the model speaks first"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    ],
)
def test_after_a_system_message_the_turns_must_still_alternate_from_user(gemma3, messages):
    tok, hf = gemma3
    with pytest.raises(ValueError, match="alternate"):
        tok.format_chat(messages)
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template(messages, tokenize=False, chat_template=GEMMA3_TEMPLATE)


def test_the_gemma3_demo_tokenizer_is_the_demo_tokenizer_plus_gemma_3s_image_pieces():
    # scripts/train_demo.py appends the two pieces, so tokenizer.py picks Gemma 3's
    # template for the demo and every other id is the other demos'.
    demo3 = Tokenizer(BASE.parents[1] / "gemma3-demo" / "tokenizer.model")
    demo = Tokenizer(BASE)
    assert demo3.is_gemma3
    assert demo3.vocab_size == demo.vocab_size + 2
    assert [demo3.sp.id_to_piece(i) for i in (demo.vocab_size, demo.vocab_size + 1)] == ["<start_of_image>", "<end_of_image>"]
    assert [demo3.sp.id_to_piece(i) for i in range(demo.vocab_size)] == [demo.sp.id_to_piece(i) for i in range(demo.vocab_size)]
    for text in HARD_STRINGS:
        assert demo3.encode(text) == demo.encode(text)
    messages = SYSTEM_CONVERSATIONS[0]
    assert demo3.format_chat(messages) == "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
