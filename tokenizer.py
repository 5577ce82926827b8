"""The Gemma tokenizer: a thin wrapper around a SentencePiece model, plus the chat format.

Gemma's tokenizer (arXiv 2403.08295, sec. 2) is SentencePiece BPE with byte
fallback, split digits, no normalisation and no dummy prefix: whitespace is kept
as is. Ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3; <start_of_turn> and
<end_of_turn> are pieces of their own, whose ids we read from the model.

The chat format is the official template of the instruction-tuned models
(google/gemma-2-2b-it tokenizer_config.json, the same in gemma-7b-it):

    <bos><start_of_turn>user
    {text}<end_of_turn>
    <start_of_turn>model
    {text}<end_of_turn>
    <start_of_turn>model          <- the generation prompt

Gemma 3 (arXiv 2503.19786) has a new 262,144-piece vocabulary (<start_of_turn>
is id 105 and <end_of_turn> 106 there, 106 and 107 in Gemma 1 and 2) read by the
same class, and a template that differs in one point: a system message, an
error above, is folded into the first user turn:

    <bos><start_of_turn>user
    {system}

    {text}<end_of_turn>
    ...
"""

import os

import sentencepiece as spm

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# A piece of Gemma 3's vocabulary (id 256000) that Gemma 1 and 2 do not have: see
# Tokenizer.is_gemma3.
END_OF_IMAGE = "<end_of_image>"


class Tokenizer:
    def __init__(self, path, proto=None):
        """path: a tokenizer.model; or, with `proto` (the bytes of a serialized
        SentencePiece model, as rebuilt from a GGUF file), the file it came from."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer model at {path!r}")
        self.sp = spm.SentencePieceProcessor()
        try:
            if proto is None:
                self.sp.Load(path)
            else:
                self.sp.LoadFromSerializedProto(proto)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path!r} is not a readable SentencePiece model: {e}") from None
        self.path = path
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.start_of_turn_id = self._piece_id(START_OF_TURN)
        self.end_of_turn_id = self._piece_id(END_OF_TURN)
        # Which chat template applies. Gemma 3 added image tokens to the vocabulary:
        # <start_of_image> (255999) and <end_of_image> (256000) in google-deepmind/gemma,
        # gemma/gm/text/_tokenizer.py, _Gemma3SpecialTokens. <start_of_image> cannot
        # tell the vocabularies apart, as Gemma 2's has it too (255999, its last id;
        # the same file, _Gemma2SpecialTokens); <end_of_image> can. A piece rather than
        # the 262,144 size: a vocabulary extended with pieces of one's own keeps it,
        # and so can a small one trained for tests (scripts/train_demo.py).
        self.is_gemma3 = self.sp.IdToPiece(self.sp.PieceToId(END_OF_IMAGE)) == END_OF_IMAGE

    def _piece_id(self, piece):
        # piece_to_id answers the <unk> id for a piece it does not know.
        i = self.sp.PieceToId(piece)
        if self.sp.IdToPiece(i) != piece:
            raise ValueError(f"tokenizer {self.path!r} has no {piece} piece")
        return i

    def encode(self, text, bos=True, eos=False):
        return [self.bos_id] * bos + self.sp.EncodeAsIds(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.DecodeIds(list(ids))

    def format_chat(self, messages, add_generation_prompt=True):
        """The official Gemma chat template, byte for byte, as a string (Gemma 3's
        for a Gemma 3 tokenizer)."""
        text, first_user_prefix = "<bos>", ""
        if self.is_gemma3 and messages and messages[0]["role"] == "system":
            # Gemma 3's template (google/gemma-3-4b-it, tokenizer_config.json
            # "chat_template", copied verbatim in linkedin/Liger-Kernel under
            # test/resources/fake_configs/Google/Gemma3/) still has no system turn: it
            # writes the system text, untrimmed, and a blank line at the start of the
            # first turn. Like the template, a system message with no turn after it
            # is dropped.
            first_user_prefix = messages[0]["content"] + "\n\n"
            messages = messages[1:]
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "system":
                # The official templates raise too: Gemma has no system turn. (Gemma 3's
                # raises for a later system message at an even place only; at an odd
                # place it writes a "system" turn, which no Gemma model was trained on.)
                if self.is_gemma3:
                    raise ValueError("system role supported only as the first message by the Gemma 3 chat template")
                raise ValueError("system role not supported by the Gemma chat template")
            if role == "assistant":
                role = "model"
            if role not in ("user", "model"):
                raise ValueError(f"unknown role {m['role']!r}: expected user, assistant or model")
            if (role == "user") != (i % 2 == 0):
                raise ValueError("conversation roles must alternate user/model/user/model/...")
            # Jinja's `trim` is Python's str.strip(): all leading/trailing whitespace.
            prefix = first_user_prefix if i == 0 else ""
            text += f"{START_OF_TURN}{role}\n{prefix}{m['content'].strip()}{END_OF_TURN}\n"
        if add_generation_prompt:
            text += f"{START_OF_TURN}model\n"
        return text

    def encode_chat(self, messages, add_generation_prompt=True):
        """Ids of format_chat's text: its "<bos>" as the BOS id, turn markers as their ids."""
        text = self.format_chat(messages, add_generation_prompt)
        # SentencePiece would read the literal "<bos>" (a control piece) as five
        # characters; <start_of_turn> and <end_of_turn> are user-defined pieces,
        # which it matches whole, but we split on them anyway so that this holds
        # whatever kind of piece a tokenizer model makes them.
        ids = [self.bos_id]
        for i, turn in enumerate(text.removeprefix("<bos>").split(START_OF_TURN)):
            if i > 0:
                ids.append(self.start_of_turn_id)
            parts = turn.split(END_OF_TURN)
            for j, part in enumerate(parts):
                if j > 0:
                    ids.append(self.end_of_turn_id)
                ids += self.sp.EncodeAsIds(part)
        return ids
