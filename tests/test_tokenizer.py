"""Tokenizers: encode -> decode is the identity on what they cover; streaming matches decoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnngen.tokenizer import CharTokenizer, SpmTokenizer, load_tokenizer

from conftest import make_english, make_songs

CORPUS = make_songs(30) + "\n\n" + make_english(20)


@pytest.fixture(scope="module")
def char_tok() -> CharTokenizer:
    return CharTokenizer.train([CORPUS])


@pytest.fixture(scope="module")
def spm_tok() -> SpmTokenizer:
    return SpmTokenizer.train([CORPUS], vocab_size=400)


@given(st.text(alphabet=sorted(set(CORPUS)), max_size=200))
def test_char_round_trip_on_covered_text(text):
    tok = CharTokenizer.train([CORPUS])
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one code point, one token
    assert tok.decode(ids) == text


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_spm_round_trips_any_text(spm_tok, text):
    assert spm_tok.decode(spm_tok.encode(text)) == text


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_streaming_decode_equals_decode(spm_tok, char_tok, text):
    for tok in (spm_tok, char_tok):
        ids = tok.encode(text)
        stream = tok.stream_decoder()
        assert "".join(stream.push(i) for i in ids) == tok.decode(ids)


def test_char_tokenizer_marks_unknown_characters(char_tok):
    assert char_tok.missing("我X😀") >= {"😀"}
    assert char_tok.encode("😀") == [char_tok.unk_id]


def test_spm_keeps_spaces_and_newlines(spm_tok):
    text = "the  night\n\n is young "
    assert spm_tok.decode(spm_tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["char", "spm"])
def test_saved_tokenizer_encodes_the_same(tmp_path, char_tok, spm_tok, kind):
    tok = char_tok if kind == "char" else spm_tok
    tok.save(tmp_path)
    again = load_tokenizer(kind, tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert again.encode(CORPUS[:500]) == tok.encode(CORPUS[:500])


@pytest.mark.parametrize("text", ["▁", "a▁b", "▁▁ x ▁", "我▁你"])
def test_spm_keeps_a_literal_word_boundary_mark(spm_tok, text):
    """U+2581 is SentencePiece's own mark for a space: a literal one must come back as itself."""
    assert spm_tok.decode(spm_tok.encode(text)) == text
    assert spm_tok.decode(spm_tok.encode_songs([text, "x"]).tolist()) == text + "\n\nx\n\n"
