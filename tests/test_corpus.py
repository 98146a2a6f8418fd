"""Corpus cleaning and vocabulary (no TensorFlow)."""

import pytest
import textgen

from job.core.errors import UserError
from job.data import corpus

NEW = (
    "The Project Gutenberg eBook of Alice\n\nLicense blah\n"
    "*** START OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***\n"
    "Body text.\nMore body.\n"
    "*** END OF THE PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***\n"
    "Updated editions will replace the previous one.\n"
)
OLD = (
    "Project Gutenberg's Alice's Adventures in Wonderland, by Lewis Carroll\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***\n"
    "Body text.\nMore body.\n"
    "End of Project Gutenberg's Alice's Adventures in Wonderland, by Lewis Carroll\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK ALICE'S ADVENTURES IN WONDERLAND ***\n"
    "***** This file should be named 11.txt or 11.zip *****\n"
)


@pytest.mark.parametrize("text", [NEW, OLD], ids=["current", "older"])
def test_strip_both_gutenberg_formats(text):
    assert corpus.clean(text, lowercase=False) == "Body text.\nMore body.\n"


def test_text_without_markers_is_kept():
    assert corpus.strip_gutenberg("just text\n") == "just text\n"


def test_bom_crlf_and_lone_cr_are_normalised():
    raw = "\ufeffLine one\r\nLine two\rLine three\n"
    assert corpus.normalise(raw) == "Line one\nLine two\nLine three\n"
    assert "\r" not in corpus.clean(raw) and not corpus.clean(raw).startswith("\ufeff")


def test_lowercase_is_default_and_optional():
    assert corpus.clean("ABC def") == "abc def\n"
    assert corpus.clean("ABC def", lowercase=False) == "ABC def\n"


def test_decode_rejects_non_utf8_and_binary():
    with pytest.raises(UserError, match="not UTF-8.*offset 3"):
        corpus.decode(b"abc\xff\xfe", "x.txt")
    with pytest.raises(UserError, match="binary"):
        corpus.decode(b"ab\x00cd", "x.bin")
    assert corpus.decode("héllo".encode(), "x") == "héllo"


def test_vocab_round_trip_and_encoding():
    vocab = corpus.Vocab.from_text("hello world\n")
    assert vocab.chars == tuple(sorted(set("hello world\n")))
    again = corpus.Vocab.from_json(vocab.to_json())
    assert again == vocab
    ids = vocab.encode("hello")
    assert ids.dtype.name == "int32" and vocab.decode(ids) == "hello"


def test_vocab_unknown_chars_named_or_skipped():
    vocab = corpus.Vocab.from_text("abc")
    with pytest.raises(UserError, match=r"'x', 'z'"):
        vocab.encode("axbz")
    assert vocab.decode(vocab.encode("axbz", skip_unknown=True)) == "ab"


def test_vocab_json_malformed():
    with pytest.raises(UserError, match="malformed"):
        corpus.Vocab.from_json("{nope")
    with pytest.raises(UserError, match="distinct"):
        corpus.Vocab.from_json('{"chars": ["a", "a"]}')


def test_split_point_is_contiguous_tail():
    assert corpus.split_point(1000, 0.1) == 900
    assert corpus.split_point(10, 0.01) == 9  # at least one held-out char


@pytest.mark.parametrize("bom", [False, True], ids=["no-bom", "bom"])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("style", ["new", "old"])
def test_a_gutenberg_book_cleans_to_exactly_its_story(tmp_path, style, crlf, bom):
    """A whole synthetic book (tests/textgen.py) read from a file, as the jobs read a corpus: header and
    footer boilerplate, BOM and CRLF all go; what is left is the story itself, lowercased, plus one newline."""
    body = textgen.story(20_000, seed=7)
    path = tmp_path / "book.txt"
    path.write_bytes(textgen.gutenberg(body, style=style, crlf=crlf, bom=bom).encode("utf-8"))
    loaded = corpus.load(str(path))
    assert loaded.text == body.lower() + "\n"
    assert loaded.sha256 == corpus.sha256(body.lower() + "\n")
    assert corpus.load(str(path), lowercase=False).text == body + "\n"
    assert "gutenberg" not in loaded.text and "\r" not in loaded.text and "\ufeff" not in loaded.text


def test_decode_rows_is_decode_of_every_row():
    import numpy as np

    from job.data.corpus import Vocab

    vocab = Vocab(("\x00", "\n", " ", "a", "é", "😀"))
    ids = np.random.default_rng(1).integers(0, len(vocab), (500, 7))
    ids[3, -2:] = 0  # trailing NULs, which numpy's fixed-width strings would drop
    assert vocab.decode_rows(ids) == [vocab.decode(row) for row in ids]
    assert vocab.decode_rows(np.zeros((2, 0), np.int64)) == ["", ""]
