"""The tokenizer: a checkpoint's tokenizer.json run by the `tokenizers` library, the DeepSeek chat
prompt (SPEC section 8), streaming decode, and the byte-level tokenizer of the random checkpoint."""
import json

import tokenizers

from weights.safetensors import CheckpointError

# DeepSeek's special tokens: the bars are FULLWIDTH VERTICAL LINE (U+FF5C) and the "spaces" LOWER
# ONE EIGHTH BLOCK (U+2581); written with ASCII '|' and '_' they are plain text to the tokenizer.
BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
USER, ASSISTANT = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK]


class Tokenizer:
    def __init__(self, path):
        self.path = str(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the library raises a bare Exception for a missing or broken file
            raise CheckpointError(f"{self.path}: cannot load tokenizer: {e}") from None

    @property
    def vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        """Token ids, nothing added; special tokens written in the text become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token):
        """The id of a token string, or None if the vocabulary lacks it."""
        return self._tok.token_to_id(token)

    def encode_chat(self, text, thinking=False, bos_id=0):
        """One user turn: BOS <｜User｜>{text}<｜Assistant｜> then </think> (chat) or <think> (thinking).

        As with the released chat template, special-token strings inside `text` are read as tokens."""
        return [bos_id] + self.encode(USER + text + ASSISTANT + (THINK if thinking else END_THINK))


class StreamDecoder:
    """Text of generated ids, as they come. A token may carry part of a UTF-8 character, so each push
    decodes the whole sequence and returns what is new, holding it back while the text ends in an
    incomplete character (which decodes as U+FFFD). Quadratic, but decoding is cheap next to a
    forward pass for the few thousand tokens of a reply."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, token_id):
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new


def byte_chars():
    """GPT-2's byte -> character map, the alphabet of the ByteLevel pre-tokenizer: printable Latin-1
    bytes stand for themselves, the other 68 (controls, space, ...) for U+0100 and up, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # '!'..'~', '¡'..'¬', '®'..'ÿ'
    chars, shifted = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + shifted))
        shifted += b not in printable
    return chars


def build_byte_tokenizer(path):
    """Write a byte-level BPE tokenizer.json with no merges: every UTF-8 byte is one token.

    Ids 0..5 are the special tokens (BOS 0 and EOS 1 as in DeepSeek's), ids 6..261 the bytes 0..255.
    Any text round-trips. This is the tokenizer of the random-weights checkpoint."""
    n = len(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: n + b for b, c in enumerate(byte_chars())})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, token in enumerate(SPECIAL_TOKENS)],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(spec, ensure_ascii=False, indent=1) + "\n")
    return path
