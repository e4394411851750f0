"""Tokenizers: char vocabulary and tiktoken encodings (loaded offline), identity round trips."""

import pytest

from gpt.errors import UserError
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer, from_identity

ZH = "你好，世界！今天天气很好。"
MIXED = "Hello, 世界! The weather 今天 is 很好 today.\nLine two: 123 ünïcödé ✓"


@pytest.fixture(scope="module")
def gpt2():
    return TiktokenTokenizer("gpt2")


@pytest.fixture(scope="module")
def cl100k():
    return TiktokenTokenizer("cl100k_base")


# ---------------------------------------------------------------------------------------------- char


def test_char_vocabulary_is_sorted_distinct_characters():
    tok = CharTokenizer()
    tok.fit("hello world")
    assert tok.chars == " dehlorw"
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.eot_id is None and tok.needs_fit


def test_char_round_trip():
    text = "To be, or not to be:\nthat is the question.\n"
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_identity_round_trip():
    tok = CharTokenizer("abc xyz\n!")
    ident = tok.identity()
    assert ident == {"type": "char", "chars": "\n !abcxyz"}
    tok2 = from_identity(ident)
    assert isinstance(tok2, CharTokenizer)
    assert tok2.chars == tok.chars and tok2.vocab_size == tok.vocab_size
    assert tok2.encode("zay cab!\n") == tok.encode("zay cab!\n")
    assert tok2.decode(tok.encode("abc")) == "abc"
    assert tok.cache_key() == "char"


def test_char_unknown_character_raises_user_error():
    tok = CharTokenizer("abc")
    with pytest.raises(UserError, match="'q'"):
        tok.encode("aqb")


def test_unknown_identity_raises_user_error():
    with pytest.raises(UserError, match="unknown tokenizer identity"):
        from_identity({"type": "sentencepiece"})


# ------------------------------------------------------------------------------------------ tiktoken


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.eot_id == 50256
    assert gpt2.vocab_size == 50257
    assert gpt2.decode([31373, 995]) == "hello world"
    assert not gpt2.needs_fit


def test_gpt2_round_trip(gpt2):
    for text in ["The quick brown fox jumps over the lazy dog.", MIXED, ZH, "  leading spaces\n\n\ttabs"]:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_special_token_text_is_encoded_as_ordinary_text(gpt2):
    ids = gpt2.encode("<|endoftext|>")
    assert gpt2.eot_id not in ids
    assert gpt2.decode(ids) == "<|endoftext|>"


def test_cl100k_round_trip_chinese_and_mixed(cl100k):
    assert cl100k.vocab_size == 100277
    for text in [ZH, MIXED]:
        ids = cl100k.encode(text)
        assert ids and all(0 <= i < cl100k.vocab_size for i in ids)
        assert cl100k.decode(ids) == text
    assert cl100k.encode("hello world") == [15339, 1917]
    assert cl100k.eot_id == 100257


def test_cl100k_alias(cl100k):
    tok = TiktokenTokenizer("cl100k")
    assert tok.name == "cl100k_base"
    assert tok.encode(ZH) == cl100k.encode(ZH)


def test_tiktoken_identity_round_trip(gpt2, cl100k):
    for tok in (gpt2, cl100k):
        ident = tok.identity()
        assert ident == {"type": "tiktoken", "name": tok.name}
        tok2 = from_identity(ident)
        assert isinstance(tok2, TiktokenTokenizer)
        assert tok2.vocab_size == tok.vocab_size and tok2.eot_id == tok.eot_id
        assert tok2.encode(MIXED) == tok.encode(MIXED)
        assert tok2.cache_key() == tok.cache_key() == f"tiktoken-{tok.name}"
    assert gpt2.cache_key() != cl100k.cache_key()


def test_unknown_tiktoken_encoding_raises_user_error():
    with pytest.raises(UserError, match="no_such_encoding"):
        TiktokenTokenizer("no_such_encoding")


def test_token_bytes_are_the_raw_bytes_of_each_token():
    """Byte-level tokens may hold part of a character: token_bytes gives their real bytes (OpenAI's logprobs
    `bytes`), which join to the text's UTF-8 even where decoding one token alone shows U+FFFD."""
    from gpt.tokenizer import CharTokenizer, TiktokenTokenizer

    tok = TiktokenTokenizer("gpt2", special=["<|user|>"])
    text = "Hi \U0001F600 caf\u00e9"
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the emoji is split over tokens
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(tok.special_id("<|user|>")) == b"<|user|>"
    char = CharTokenizer("ab\u00e9")
    assert [char.token_bytes(i) for i in char.encode("\u00e9a")] == ["\u00e9".encode(), b"a"]
