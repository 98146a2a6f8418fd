"""The prepare stage (job/data/prepare.py): streaming clean == corpus.clean, listings, per-file held-out tails, the
vocabulary with an unknown id, bad files, caching by fingerprint, open_local. Synthetic text only, no network
(except one e2e test against the local moto S3 server), no Ray, no TensorFlow."""

from __future__ import annotations

import json
import os
import random
import re

import numpy as np
import pytest

from job.core import storage
from job.core.errors import UserError, run_cli
from job.data import corpus, prepare
from job.data.corpus import Vocab
from tests import textgen

# ------------------------------------------------------------------------------------- synthetic text

WORDS = ["alice", "Queen", "ΣΟΦΟΣ", "όσος", "ΑΣ", "naïve", "日本語", "😀x", "İstanbul", "e\u0301", "***", "*",
         "End", "of", "Project", "Gutenberg", "\ufeff", "ﬁ", "ẞ", "\u00a0"]
MARKERS = [
    "*** START OF THE PROJECT GUTENBERG EBOOK ALICE ***",
    "***START OF THIS PROJECT GUTENBERG E-BOOK x",
    "  *** start of the project gutenberg ebook lower",
    "*** END OF THE PROJECT GUTENBERG EBOOK ALICE ***",
    "End of Project Gutenberg's Alice, by Lewis Carroll",
    "End of the Project Gutenberg EBook of X",
    "End of Project Gutenberg’s Alice",
    "\t*** END OF THIS PROJECT GUTENBERG EBOOK",
    "***",  # followed by the next line, an END marker can span two lines
    "END OF THE PROJECT GUTENBERG EBOOK Y",
    "End of Project Gutenbergs",  # not a marker
    "text *** END OF THE PROJECT GUTENBERG EBOOK",  # not at a line start
]
BLANKS = ["", " ", "  ", "\t", "\u3000", " \t ", "\x0c"]


def synthetic(rng: random.Random, lines: int = 30) -> str:
    out = []
    for i in range(rng.randint(0, lines)):
        roll = rng.random()
        if roll < 0.15 or (i < 4 and roll < 0.3):
            out.append(rng.choice(MARKERS))
        elif roll < 0.4:
            out.append(rng.choice(BLANKS))
        else:
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]
            out.append(rng.choice(["", " ", "  "]) + " ".join(words) + rng.choice(["", " ", "Σ", " \t"]))
    text = "".join(line + rng.choice(["\n", "\n", "\r\n", "\r"]) for line in out)
    if rng.random() < 0.3 and text:
        text = text.rstrip("\r\n")
    if rng.random() < 0.2:
        text = "\ufeff" + text
    if rng.random() < 0.2:
        text = rng.choice(["\n\n", "  \n", "\r\n"]) + text
    return text


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i: i + size] for i in range(0, len(data), size)]


def streamed(data: bytes, chunk: int, lowercase: bool = True, head_chars: int = prepare.HEAD_CHARS) -> str:
    return "".join(prepare.clean_stream(pieces(data, chunk), "f.txt", lowercase, chunk, head_chars))


EDGE_CASES = ["", "\n", "   ", "\ufeff", "\r", "a\r", "a\r\n", "\r\r\n\n", "ΑΣ\nΣ", "x" * 50, "\ufeff\ufeffa",
              "*** START OF THE PROJECT GUTENBERG EBOOK A ***", "***\n\n*** END OF THE PROJECT GUTENBERG EBOOK\nz",
              "a\n***\n  \nEND OF THE PROJECT GUTENBERG EBOOK\nb",
              "body\n\t\n \n*** END OF THIS PROJECT GUTENBERG EBOOK"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 11, 64, 4096])
def test_streaming_clean_equals_corpus_clean(chunk):
    """The property the whole stage rests on, over many texts with markers, CRLF pairs and multi-byte
    characters split across chunks (chunk 1..7 splits every UTF-8 sequence and CRLF pair somewhere)."""
    rng = random.Random(chunk)
    texts = EDGE_CASES + [synthetic(rng) for _ in range(150)]
    checked_with_start = 0
    for i, text in enumerate(texts):
        data = text.encode("utf-8")
        lowercase = i % 3 != 0
        expected = corpus.clean(corpus.decode(data, "f.txt"), lowercase=lowercase)
        start = corpus._START.search(corpus.normalise(text))
        checked_with_start += bool(start)
        # START is looked for in the first head_chars: give it exactly enough, and also everything
        for head in {start.end() if start else 1, 10**9}:
            got = streamed(data, chunk, lowercase, head)
            assert got == expected, (chunk, head, text)
    assert checked_with_start > 20


def test_end_marker_search_finds_what_the_full_search_finds():
    """find_end runs the marker search only around "Project Gutenberg" lines; it must agree with the plain
    search on where the first marker starts and ends, markers spanning "***" and blank lines included."""
    rng = random.Random(3)
    found = 0
    for _ in range(3000):
        text = synthetic(rng, 40).replace("\r\n", "\n").replace("\r", "\n")
        if rng.random() < 0.3:
            text = text.replace("End", "END", 1).replace("Project", "PROJECT")
        full = corpus._END.search(text)
        fast = prepare.find_end(text)
        assert (fast and fast.span()) == (full and full.span()), text
        found += full is not None
    assert found > 500  # the texts do hold markers


def test_text_after_the_end_marker_is_still_decoded():
    """As in corpus.clean, which decodes the whole file: a bad byte in the footer is an error."""
    data = b"body\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n" + b"license\n" * 20 + b"licen\xe7e\n"
    with pytest.raises(prepare.BadFileError, match="offset 215"):
        streamed(data, 4, head_chars=8)


def test_start_marker_outside_the_head_is_not_looked_for():
    text = "x" * 100 + "\n*** START OF THE PROJECT GUTENBERG EBOOK A ***\nbody\n"
    assert streamed(text.encode(), 8, head_chars=200) == "body\n"
    assert streamed(text.encode(), 8, head_chars=20).startswith("xxx")


def test_forced_cuts_bound_chunk_size(monkeypatch):
    """Lines or blank runs longer than the forced-cut size still give bounded chunks (and, without markers,
    the same text)."""
    monkeypatch.setattr(prepare, "MIN_FORCE_CHARS", 64)
    rng = random.Random(5)
    text = " ".join(rng.choice(["ΑΣ", "word", "ΣΟΦΟΣ"]) for _ in range(2000)) + "\n" + "\n" * 500 + "tail\n"
    chunks = list(prepare.line_chunks([text[i: i + 7] for i in range(0, len(text), 7)], 8))
    assert "".join(chunks) == text
    assert max(len(c) for c in chunks) <= 64 + 7
    assert streamed(text.encode(), 8) == corpus.clean(text)


@pytest.mark.parametrize("data", [
    b"abc\xff\xfe", b"ok \xe2\x82", "héllo".encode() + b"\xc3", b"a" * 70 + b"\x80" + b"b" * 10,
    "日本".encode() + b"\xe6\x97" + b"x", b"\xff" + b"\x00", b"abc" + b"\x00" * 3, b"a" * 70000 + b"\x00",
    "utf-16 text".encode("utf-16"), b"\xfe\xff" + "be".encode("utf-16-be"),
])
@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_decode_errors_match_corpus_decode(data, chunk):
    with pytest.raises(UserError) as reference:
        corpus.decode(data, "f.txt")
    with pytest.raises(prepare.BadFileError) as streaming:
        streamed(data, chunk)
    # "(byte 0x.. at offset N)" / "(NUL bytes…)" / "at offset N" (a NUL after the first 64 KiB: damaged, not text)
    found = re.search(r"\(.*?\)|at offset \d+", str(reference.value))
    assert found.group(0) in str(streaming.value)


# -------------------------------------------------------------------------------------------- listing


def write(path, text: str | bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
    return str(path)


def test_list_sources_folder_glob_and_single_file(tmp_path):
    root = tmp_path / "books"
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/deep/d.md", ".hidden.txt", ".git/x.txt", "sub/.DS_Store"]:
        write(root / name, f"text of {name}\n")
    names = [s.name for s in prepare.list_sources(str(root))]
    assert names == ["a.txt", "b.txt", "sub/c.txt", "sub/deep/d.md"]
    assert [s.name for s in prepare.list_sources(str(root) + "/")] == names
    assert [s.name for s in prepare.list_sources("file://" + str(root))] == names
    assert prepare.list_sources("file://" + str(root))[0].url == "file://" + str(root / "a.txt")
    assert [s.name for s in prepare.list_sources(str(root / "*.txt"))] == ["a.txt", "b.txt"]
    assert [s.name for s in prepare.list_sources(str(root / "**" / "*.txt"))] == ["a.txt", "b.txt", "sub/c.txt"]
    single = prepare.list_sources(str(root / "sub" / "c.txt"))
    assert [(s.name, s.size) for s in single] == [("c.txt", len("text of sub/c.txt\n"))]
    assert single[0].version == str(os.stat(root / "sub" / "c.txt").st_mtime_ns)
    for missing in [str(root / "nope.txt"), str(root / "*.csv"), str(tmp_path / "none") + "/"]:
        with pytest.raises(UserError, match=re.escape(missing.split("/")[-1] or "none")):
            prepare.list_sources(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files found"):
        prepare.list_sources(str(tmp_path / "empty"))


# -------------------------------------------------------------------------------- prepare: contents


def book(seed: int, chars: int) -> str:
    """A Gutenberg-style book of about `chars` characters with Windows line ends."""
    rng = random.Random(seed)
    words = ["the", "Queen", "said", "Alice", "naïve", "rabbit", "—", "tea", "ΣΟΦΟΣ", "time", "“well”", "."]
    lines = []
    size = 0
    while size < chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(line)
        size += len(line) + 1
    body = "\r\n".join(lines)
    return ("The Project Gutenberg eBook\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n\r\n" + body +
            "\r\n\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicense\r\n")


def read_bin(folder, name, meta):
    return np.fromfile(os.path.join(folder, name), dtype=meta["dtype"])


def run(corpus_url, out, **kwargs):
    lines = []
    kwargs.setdefault("chunk_chars", 512)  # many chunks per file
    meta = prepare.prepare(str(corpus_url), str(out), log=lines.append, **kwargs)
    return meta, lines


def test_single_file_split_matches_training_today(tmp_path):
    raw = book(1, 20_000)
    path = write(tmp_path / "book.txt", raw)
    meta, lines = run(path, tmp_path / "ds")
    text = corpus.clean(raw)
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    split = corpus.split_point(len(text), 0.1)
    assert meta["vocab"] == {"chars": list(vocab.chars), "unknown": False}
    assert meta["dtype"] == "uint8"
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "train.bin", meta), ids[:split])
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "val.bin", meta), ids[split - 1024:])
    assert meta["val_segments"] == [[0, 1024, len(text) - split]]
    assert meta["train_chars"] == split and meta["val_chars"] == len(text) - split + 1024
    assert meta["files"][0]["cleaned_chars"] == len(text) and meta["files"][0]["size"] == len(raw.encode())
    assert meta["options"]["min_char_count_resolved"] == 1
    assert len(lines) == 1 and "1 file(s)" in lines[0]


def test_short_single_file_keeps_the_split_with_less_context(tmp_path):
    text = corpus.clean("short text, but long enough for a split\n" * 5)
    meta, _ = run(write(tmp_path / "a.txt", text), tmp_path / "ds")
    split = corpus.split_point(len(text), 0.1)
    assert meta["val_segments"] == [[0, split, len(text) - split]]
    meta, _ = run(write(tmp_path / "one.txt", "x"), tmp_path / "ds1")  # "x\n": one char each
    assert (meta["train_chars"], meta["val_segments"]) == (1, [[0, 1, 1]])


def test_many_files_hold_out_the_tail_of_each(tmp_path):
    raws = {"a.txt": book(1, 30_000), "b/b.txt": book(2, 800), "c.txt": book(3, 12_000)}
    for name, raw in raws.items():
        write(tmp_path / "books" / name, raw)
    meta, _ = run(tmp_path / "books", tmp_path / "ds", lowercase=False)
    texts = [corpus.clean(raws[n], lowercase=False) for n in ["a.txt", "b/b.txt", "c.txt"]]
    vocab = Vocab(tuple(meta["vocab"]["chars"]))
    assert vocab == Vocab.from_text("".join(texts))
    splits = [corpus.split_point(len(texts[0]), 0.1), len(texts[1]), corpus.split_point(len(texts[2]), 0.1)]
    assert [f["train_chars"] for f in meta["files"]] == splits  # b.txt is too short for a tail: all training
    train = vocab.decode(read_bin(tmp_path / "ds", "train.bin", meta))
    assert train == "\n".join(t[:s] for t, s in zip(texts, splits, strict=True))
    val = vocab.decode(read_bin(tmp_path / "ds", "val.bin", meta))
    assert len(meta["val_segments"]) == 2
    for (offset, context, scored), t, s in zip(meta["val_segments"], [texts[0], texts[2]], [splits[0], splits[2]],
                                               strict=True):
        assert context == 1024 and scored == len(t) - s
        assert val[offset: offset + context + scored] == t[s - 1024:]
    assert meta["val_chars"] == len(val) and meta["val_scored_chars"] == sum(len(t) - s for t, s in
                                                                             zip(texts, splits, strict=True))
    assert [f["name"] for f in meta["files"]] == ["a.txt", "b/b.txt", "c.txt"]


def test_glob_corpus(tmp_path):
    for name, seed in [("x.txt", 1), ("y.txt", 2), ("z.md", 3)]:
        write(tmp_path / "c" / name, book(seed, 5000))
    meta, _ = run(str(tmp_path / "c" / "*.txt"), tmp_path / "ds")
    assert [f["name"] for f in meta["files"]] == ["x.txt", "y.txt"]


def test_no_file_has_a_tail(tmp_path):
    write(tmp_path / "c" / "a.txt", "short one\n")
    write(tmp_path / "c" / "b.txt", "short two\n")
    with pytest.raises(UserError, match="corpus too short"):
        run(tmp_path / "c", tmp_path / "ds")


BAD = {"bin.dat": b"PK\x03\x04\x00\x00binary", "latin.txt": "café au lait\n".encode("latin-1"),
       "empty.txt": b" \n\n", "boiler.txt": b"license\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n \n"
       b"*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicense\n",
       "late.txt": b"good text " * 300 + b"\xff",  # fails after some cleaned text was written (rolled back)
       "footer.txt": b"body\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicen\xe7e\n"}  # read to the end


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_file_refused_with_one_line_naming_it(tmp_path, bad, capsys):
    write(tmp_path / "c" / "good.txt", book(1, 5000))
    write(tmp_path / "c" / bad, BAD[bad])
    with pytest.raises(UserError, match=re.escape(bad)) as err:
        run(tmp_path / "c", tmp_path / "ds")
    assert "\n" not in str(err.value) and "--skip-bad-files" in str(err.value)
    assert not (tmp_path / "ds" / "meta.json").exists()
    code = run_cli(prepare.main, ["--corpus", str(tmp_path / "c"), "--output", str(tmp_path / "ds")])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1 and err_lines[0].startswith("error: ") and bad in err_lines[0]
    assert not (tmp_path / "ds").exists()  # nothing left behind, not even the folder made for the work


def test_bad_files_skipped_and_counted(tmp_path):
    good = book(1, 5000)
    write(tmp_path / "c" / "good.txt", good)
    for name, data in BAD.items():
        write(tmp_path / "c" / name, data)
    meta, lines = run(tmp_path / "c", tmp_path / "ds", skip_bad_files=True)
    assert [f["name"] for f in meta["files"]] == ["good.txt"]
    assert sorted(s["name"] for s in meta["skipped_files"]) == sorted(BAD)
    assert f"skipped {len(BAD)} bad file(s)" in lines[0]
    text = corpus.clean(good)
    vocab = Vocab.from_text(text)
    split = corpus.split_point(len(text), 0.1)
    np.testing.assert_array_equal(read_bin(tmp_path / "ds", "train.bin", meta), vocab.encode(text)[:split])
    assert meta["options"]["skip_bad_files"] is True


def _dataset_bytes(folder) -> dict[str, object]:
    """Everything a dataset holds, but the seconds it took (and the checksum over them)."""
    meta = json.loads((folder / "meta.json").read_text())
    for key in ("seconds", "checksum"):
        meta.pop(key)
    return {"meta": meta, "train": (folder / "train.bin").read_bytes(), "val": (folder / "val.bin").read_bytes()}


def test_parallel_preparation_is_byte_for_byte_the_serial_one(tmp_path):
    """Files cleaned side by side in child processes give the serial dataset exactly: ids, vocabulary, held-out
    segments, counts, checksums, fingerprint, skipped files (listing order kept), with a progress line each."""
    rng = random.Random(7)
    for i in range(9):
        write(tmp_path / "c" / f"{i:02d}.txt", book(i, rng.randint(2_000, 9_000)) if i % 3 else
              synthetic(rng, 400) + "\n" + book(i, 3_000))
    for name, data in BAD.items():
        write(tmp_path / "c" / "sub" / name, data)
    datasets = {}
    for workers in (1, 2, 3):
        meta, lines = run(tmp_path / "c", tmp_path / f"ds{workers}", skip_bad_files=True, workers=workers,
                          lowercase=workers != 3, log_every=1e-9)
        assert any(line.startswith(f"preparing {tmp_path / 'c'}: read ") for line in lines), lines
        assert any(" encoded " in line for line in lines), lines
        datasets[workers] = _dataset_bytes(tmp_path / f"ds{workers}")
    assert len(datasets[1]["meta"]["files"]) >= 6 and len(datasets[1]["meta"]["skipped_files"]) >= len(BAD)
    assert datasets[2] == datasets[1]
    assert datasets[3]["train"] != datasets[1]["train"]  # (the comparison can tell: --keep-case differs)
    serial = run(tmp_path / "c", tmp_path / "ds4", skip_bad_files=True, workers=1, lowercase=False)[0]
    assert _dataset_bytes(tmp_path / "ds4") == datasets[3] and serial["files"] == datasets[3]["meta"]["files"]


def test_parallel_preparation_refuses_the_first_bad_file_as_the_serial_one_does(tmp_path):
    for i in range(4):
        write(tmp_path / "c" / f"{i}.txt", book(i, 4_000))
    write(tmp_path / "c" / "1b.txt", BAD["late.txt"])
    write(tmp_path / "c" / "2b.txt", BAD["latin.txt"])
    refusals = []
    for workers in (1, 3):
        with pytest.raises(UserError) as err:
            run(tmp_path / "c", tmp_path / "ds", workers=workers)
        refusals.append(str(err.value))
        assert not (tmp_path / "ds").exists()
    assert refusals[0] == refusals[1] and "1b.txt" in refusals[0]


def _one_big_file(seed: int, end_marker: bool, blank_start: bool) -> str:
    """About 400 KB: invented prose with "***" and blank lines, Greek capitals (final sigma), CR, CRLF and LF
    line ends; a Gutenberg START (or a long run of blank lines) first; an END marker two thirds in, or none."""
    rng = random.Random(seed)
    lines = textgen.story(400_000, seed).split("\n")
    out = []
    for i, line in enumerate(lines):
        roll = rng.random()
        if roll < 0.05:
            line = rng.choice(["***", "   ", "ΣΟΦΟΣ ΟΔΟΣ", "  *** ", "\u3000"])
        elif roll < 0.1:
            line += rng.choice([" ΟΔΟΣ", "Σ", " \t"])
        out.append(line + rng.choice(["\n", "\n", "\r\n", "\r"]))
        if end_marker and i == len(lines) * 2 // 3:
            out.append("***\r\n\r\nEND OF THE PROJECT GUTENBERG EBOOK X\r\nafter the end, still read\n")
    start = "The Project Gutenberg eBook\n*** START OF THE PROJECT GUTENBERG EBOOK Y ***\n"
    head = "\n  \n" * 1000 if blank_start else start
    return head + "".join(out) + " \n\n  "


@pytest.mark.parametrize("end_marker,blank_start", [(True, False), (False, True)])
def test_one_large_file_in_parts_is_byte_for_byte_the_serial_one(tmp_path, monkeypatch, end_marker, blank_start):
    """A file larger than SPLIT_BYTES is cleaned in ranges cut at safe line ends, side by side: the START marker
    in the head, an END marker in a middle range (later ranges dropped), leading blank lines, trailing spaces,
    CR/CRLF, final sigmas: the dataset is the serial one byte for byte."""
    text = _one_big_file(3, end_marker, blank_start)
    write(tmp_path / "big.txt", text)
    monkeypatch.setattr(prepare, "SPLIT_BYTES", 16_000)  # about 20 parts
    joined = []
    real_join = prepare._join_parts
    monkeypatch.setattr(prepare, "_join_parts", lambda *a: joined.append(real_join(*a)) or joined[-1])
    for workers in (1, 3):
        run(tmp_path / "big.txt", tmp_path / f"ds{workers}", workers=workers, head_chars=2_000)
    assert len(joined) == 1 and joined[0] is not None and len(joined[0].segments) > 10  # the parts were used
    assert _dataset_bytes(tmp_path / "ds3") == _dataset_bytes(tmp_path / "ds1")


def test_one_large_file_with_a_bad_byte_gets_the_serial_verdict(tmp_path, monkeypatch):
    text = _one_big_file(4, True, False).encode()
    bad = text[: len(text) // 2] + b"\xff" + text[len(text) // 2:]  # in a middle part
    write(tmp_path / "c" / "big.txt", bad)
    monkeypatch.setattr(prepare, "SPLIT_BYTES", 16_000)
    verdicts = []
    for workers in (1, 2):
        with pytest.raises(UserError) as err:
            run(tmp_path / "c", tmp_path / "ds", workers=workers, head_chars=2_000)
        verdicts.append(str(err.value))
    assert verdicts[0] == verdicts[1] and f"at offset {len(text) // 2}" in verdicts[0]


def test_split_points_fall_after_safe_line_ends():
    data = (b"line one\n***\n\n   \nEND\r\nx\r\ny\ry\n" * 400) + b"tail"
    cuts = prepare.split_points(lambda at, n: data[at: at + n], len(data), 100)
    assert cuts[0] == 0 and cuts[-1] == len(data) and cuts == sorted(set(cuts)) and len(cuts) > 50
    for cut in cuts[1:-1]:
        line = data[: cut - 1].rsplit(b"\n", 1)[-1]
        assert data[cut - 1: cut] == b"\n" and line.strip() not in (b"", b"***") and not line.endswith(b"\r\r")


def test_the_cli_prepares_in_child_processes(tmp_path):
    """`python -m job.prepare --workers 2`: the children find the module's functions by its name (not
    __main__'s), and the dataset is the one prepared in one process."""
    import subprocess
    import sys

    for i in range(3):
        write(tmp_path / "c" / f"{i}.txt", book(i, 6_000))
    proc = subprocess.run([sys.executable, "-m", "job.prepare", "--corpus", str(tmp_path / "c"), "--output",
                           str(tmp_path / "two"), "--workers", "2", "--log-every-seconds", "0"],
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 2 and not proc.stderr  # "preparing dataset ..." and the summary: no noise
    run(tmp_path / "c", tmp_path / "one", workers=1, chunk_chars=prepare.CHUNK_CHARS)
    assert _dataset_bytes(tmp_path / "two") == _dataset_bytes(tmp_path / "one")


def test_automatic_workers_only_for_several_large_enough_files(monkeypatch):
    monkeypatch.setattr(prepare, "usable_cores", lambda: 12)
    big = prepare.PARALLEL_MIN_BYTES
    files = [prepare.Source(f"f{i}", f"f{i}", big // 4, None) for i in range(6)]
    assert prepare.auto_workers(files) == 6
    assert prepare.auto_workers(files[:1]) == 1
    assert prepare.auto_workers([prepare.Source("f", "f", 10, None)] * 6) == 1
    assert prepare.auto_workers([prepare.Source("f", "f", 5 * prepare.SPLIT_BYTES, None)]) == 5  # one file in parts
    monkeypatch.setattr(prepare, "usable_cores", lambda: 2)
    assert prepare.auto_workers(files) == 2


def test_progress_line():
    line = prepare.progress_line("s3://b/books/", "read", 1_200_000_000, 10_000_000_000, 12.0)
    assert line == "preparing s3://b/books/: read 1.20 GB of 10.00 GB (12%), 100 MB/s, eta 1:28"
    assert prepare.progress_line("x", "encoded", 5_000_000, None, 1.0) == "preparing x: encoded 5.0 MB, 5 MB/s"


def test_prefetched_reads_ahead_a_bounded_amount_and_passes_errors():
    pulled = []

    def chunks():
        for i in range(100):
            pulled.append(i)
            yield bytes([i])
        raise OSError("disk gone")

    it = prefetch = prepare.prefetched(chunks(), depth=2)
    assert next(it) == b"\x00"
    import time as _time

    _time.sleep(0.2)
    assert len(pulled) <= 4  # the chunk handed out, `depth` queued and one in the reader's hands
    with pytest.raises(OSError, match="disk gone"):
        list(prefetch)


def test_min_char_count_maps_rare_chars_to_unknown(tmp_path):
    text = "abc abc abc\n" * 400 + "rare: é ü\n" + "\ufffd" * 5 + "\n" + "abc\n" * 400
    meta, lines = run(write(tmp_path / "a.txt", text), tmp_path / "ds", min_char_count=3)
    vocab = Vocab(tuple(meta["vocab"]["chars"]), has_unknown=meta["vocab"]["unknown"])
    cleaned = corpus.clean(text)
    counts = {c: cleaned.count(c) for c in set(cleaned)}
    rare = sorted(c for c, n in counts.items() if n < 3)
    assert rare and "\ufffd" not in rare  # U+FFFD is frequent here: it is kept, as the unknown id itself
    assert vocab.has_unknown and vocab.chars[-1] == "\ufffd" and vocab.unknown_id == len(vocab) - 1
    assert list(vocab.chars[:-1]) == sorted(c for c, n in counts.items() if n >= 3 and c != "\ufffd")
    assert meta["unknown_chars"]["distinct"] == len(rare)
    assert meta["unknown_chars"]["occurrences"] == sum(counts[c] for c in rare)
    assert "mapped to the unknown id" in lines[0]
    ids = np.concatenate([read_bin(tmp_path / "ds", "train.bin", meta),
                          read_bin(tmp_path / "ds", "val.bin", meta)[1024:]])
    assert vocab.decode(ids) == "".join("\ufffd" if c in rare else c for c in cleaned)
    assert meta["options"]["min_char_count"] == 3


def test_auto_min_char_count_keeps_every_char_of_a_small_corpus(tmp_path):
    text = book(4, 10_000) + "one-off: ж 😀\n"
    meta, _ = run(write(tmp_path / "a.txt", text), tmp_path / "ds")
    assert meta["vocab"]["chars"] == sorted(set(corpus.clean(text))) and not meta["vocab"]["unknown"]
    assert meta["options"]["min_char_count"] == "auto" and meta["options"]["min_char_count_resolved"] == 1
    assert prepare.resolve_min_char_count("auto", 1_000_000_000) == 100
    assert prepare.resolve_min_char_count(None, 19_999_999) == 1


def test_uint16_for_large_vocabularies(tmp_path):
    many = "".join(chr(0x4E00 + i) for i in range(300))
    text = (many + "\n") * 10
    meta, _ = run(write(tmp_path / "a.txt", text), tmp_path / "ds")
    assert meta["dtype"] == "uint16" and len(meta["vocab"]["chars"]) == 301
    ids = read_bin(tmp_path / "ds", "train.bin", meta)
    assert ids.dtype == np.uint16 and Vocab(tuple(meta["vocab"]["chars"])).decode(ids) == text[: len(ids)]
    assert prepare.dtype_for(256) == "uint8" and prepare.dtype_for(257) == "uint16"


def test_meta_fields_and_corpus_hash(tmp_path):
    write(tmp_path / "c" / "a.txt", book(1, 3000))
    write(tmp_path / "c" / "b.txt", book(2, 3000))
    meta, _ = run(tmp_path / "c", tmp_path / "ds")
    on_disk = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert on_disk == meta
    assert meta["format"] == "charlstm-dataset" and meta["format_version"] == 1
    import hashlib

    shas = [hashlib.sha256((tmp_path / "c" / n).read_bytes()).hexdigest() for n in ["a.txt", "b.txt"]]
    assert [f["sha256"] for f in meta["files"]] == shas
    assert meta["corpus_sha256"] == hashlib.sha256(f"a.txt\0{shas[0]}\nb.txt\0{shas[1]}\n".encode()).hexdigest()
    assert meta["seconds"] >= 0 and len(meta["fingerprint"]) == 64


# ------------------------------------------------------------------------------ cache and publishing


def test_find_cached_reads_no_corpus_file(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    write(folder / "a.txt", book(1, 5000))
    write(folder / "b.txt", book(2, 5000))
    out = str(tmp_path / "ds")
    meta, _ = run(folder, out)
    options = prepare.make_options()

    def no_reading(url):
        raise AssertionError(f"read {url}")

    monkeypatch.setattr(storage, "open_read", no_reading)
    assert prepare.find_cached(out, str(folder), options) == meta
    logs = []
    assert prepare.ensure(str(folder), out, log=logs.append) == meta and "reusing" in logs[0]
    # other options: a miss, decided without reading either
    assert prepare.find_cached(out, str(folder), prepare.make_options(lowercase=False)) is None
    assert prepare.find_cached(out, str(folder), prepare.make_options(val_fraction=0.2)) is None
    assert prepare.find_cached(out, str(folder), prepare.make_options(min_char_count=2)) is None
    assert prepare.find_cached(str(tmp_path / "elsewhere"), str(folder), options) is None
    # a changed file (same size, new mtime), an added file, a missing .bin: misses
    st = os.stat(folder / "a.txt")
    write(folder / "a.txt", (folder / "a.txt").read_bytes().replace(b"Queen", b"queen"))
    os.utime(folder / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert prepare.find_cached(out, str(folder), options) is None
    os.utime(folder / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prepare.find_cached(out, str(folder), options) == meta
    write(folder / "new.txt", "more\n")
    assert prepare.find_cached(out, str(folder), options) is None
    os.remove(folder / "new.txt")
    os.remove(os.path.join(out, "val.bin"))
    assert prepare.find_cached(out, str(folder), options) is None


def test_outputs_written_bins_first_then_meta(tmp_path, monkeypatch):
    path = write(tmp_path / "a.txt", book(1, 5000))
    out = tmp_path / "ds"
    run(path, out)
    order = []
    real_replace, real_write, real_delete = os.replace, storage.write_text, storage.delete

    def spy_replace(src, dst):
        order.append(os.path.basename(dst))
        return real_replace(src, dst)

    def spy_write(url, text):
        order.append(os.path.basename(url))
        assert (out / "train.bin").exists() and (out / "val.bin").exists()
        return real_write(url, text)

    def spy_delete(url, recursive=False):
        order.append("delete " + os.path.basename(url))
        return real_delete(url, recursive)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(storage, "write_text", spy_write)
    monkeypatch.setattr(storage, "delete", spy_delete)
    run(path, out, val_fraction=0.2)
    bins_and_meta = [o for o in order if o in ("train.bin", "val.bin", "meta.json", "delete meta.json")]
    assert bins_and_meta[0] == "delete meta.json"  # the old dataset stops counting before its .bin change
    assert bins_and_meta[-1] == "meta.json" and {"train.bin", "val.bin"} <= set(bins_and_meta[1:-1])
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]


def test_open_local_maps_a_local_dataset_in_place(tmp_path):
    path = write(tmp_path / "a.txt", book(1, 5000))
    meta, _ = run(path, tmp_path / "ds")
    ds = prepare.open_local(str(tmp_path / "ds"), meta)
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint8 and not ds.train.flags.writeable
    assert ds.folder == str(tmp_path / "ds") and len(ds.val) == meta["val_chars"]
    text = corpus.clean(book(1, 5000))
    assert ds.vocab.decode(ds.train) == text[: meta["train_chars"]]
    assert ds.val_segments.tolist() == meta["val_segments"]
    assert prepare.open_local("file://" + str(tmp_path / "ds")).meta == meta  # meta read when not given
    with pytest.raises(UserError, match="no prepared dataset"):
        prepare.open_local(str(tmp_path / "nothing"))
    with open(tmp_path / "ds" / "val.bin", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(UserError, match="val.bin has"):
        prepare.open_local(str(tmp_path / "ds"), meta)


def test_open_local_downloads_a_remote_dataset_once(tmp_path, monkeypatch):
    """A non-local dataset (fsspec's in-memory filesystem stands in for S3) is downloaded into the cache
    folder once; a second open reuses it."""
    path = write(tmp_path / "a.txt", book(1, 5000))
    url = f"memory://charlstm-test-{os.getpid()}/ds"
    meta, _ = run(path, url)
    assert prepare.find_cached(url, path, prepare.make_options()) == meta
    monkeypatch.setenv("CHARLSTM_CACHE_DIR", str(tmp_path / "cache"))
    ds = prepare.open_local(url, meta)
    assert ds.folder == str(tmp_path / "cache" / meta["fingerprint"])
    assert ds.vocab.decode(ds.val) == corpus.clean(book(1, 5000))[-meta["val_chars"]:]
    monkeypatch.setattr(storage, "download_file", lambda *a: pytest.fail("downloaded again"))
    again = prepare.open_local(url, meta)
    np.testing.assert_array_equal(again.train, ds.train)
    storage.delete(url, recursive=True)


def test_options_are_checked(tmp_path):
    path = write(tmp_path / "a.txt", book(1, 3000))
    for kwargs, message in [({"val_fraction": 0.0}, "--val-fraction"), ({"val_fraction": 0.9}, "--val-fraction"),
                            ({"min_char_count": 0}, "--min-char-count"), ({"min_char_count": "x"}, "--min-char")]:
        with pytest.raises(UserError, match=message):
            run(path, tmp_path / "ds", **kwargs)


def test_cli_prepares_then_reuses(tmp_path, capsys):
    path = write(tmp_path / "a.txt", book(1, 5000))
    args = ["--corpus", path, "--output", str(tmp_path / "ds"), "--keep-case", "--min-char-count", "1"]
    assert run_cli(prepare.main, args) == 0
    assert "preparing" in capsys.readouterr().out
    assert run_cli(prepare.main, args) == 0
    assert "reusing" in capsys.readouterr().out
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["options"]["lowercase"] is False and meta["options"]["min_char_count"] == 1
    assert run_cli(prepare.main, [*args, "--force"]) == 0 and "preparing" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- Vocab


def test_vectorised_encode_matches_the_old_loop():
    text = "Hello, wörld! 😀 ΣΑΣ\n" * 3
    vocab = Vocab.from_text(text)
    index = vocab.index
    old = np.fromiter((index[c] for c in text), dtype=np.int32)
    np.testing.assert_array_equal(vocab.encode(text), old)
    assert vocab.encode(text).dtype == np.int32 and vocab.encode("").shape == (0,)
    with pytest.raises(UserError, match=r"2 character\(s\).*'x', 'z'"):
        vocab.encode("Hxzz")
    assert vocab.decode(vocab.encode("Hxlz", skip_unknown=True)) == "Hl"
    assert vocab.unknown("Hxzz") == ["x", "z"]


def test_vocab_with_unknown_id():
    counts = np.zeros(0x110000, np.int64)
    for c, n in {"a": 10, "b": 5, "é": 1, "\U0001f600": 9}.items():
        counts[ord(c)] = n
    vocab = Vocab.from_counts(counts, min_count=5)
    assert vocab.chars == ("a", "b", "\U0001f600", "\ufffd") and vocab.has_unknown and vocab.unknown_id == 3
    assert vocab.encode("abéz\U0001f600").tolist() == [0, 1, 3, 3, 2]
    assert vocab.decode([0, 3]) == "a\ufffd"
    assert Vocab.from_json(vocab.to_json()) == vocab
    assert json.loads(vocab.to_json())["unknown"] is True
    plain = Vocab.from_counts(counts, min_count=1)
    assert not plain.has_unknown and plain.unknown_id is None and plain.chars == ("a", "b", "é", "\U0001f600")
    counts[0xFFFD] = 7  # a kept U+FFFD moves to the end and doubles as the unknown id
    vocab = Vocab.from_counts(counts, min_count=5)
    assert vocab.chars == ("a", "b", "\U0001f600", "\ufffd") and vocab.encode("\ufffdé").tolist() == [3, 3]
    assert Vocab.from_json('{"chars": ["a", "b"]}') == Vocab(("a", "b"))  # written before the unknown id
    with pytest.raises(UserError, match="unknown"):
        Vocab.from_json('{"chars": ["a", "b"], "unknown": true}')
    with pytest.raises(ValueError):
        Vocab(("a",), has_unknown=True)


# ---------------------------------------------------------------------------------------------- S3 (e2e)


@pytest.mark.e2e
def test_prepare_from_and_to_s3(s3_server, s3_prefix, tmp_path, monkeypatch):
    client = s3_server.client()
    key = s3_prefix.split("/", 3)[3]
    for name, seed in [("books/a.txt", 1), ("books/sub/b.txt", 2)]:
        client.put_object(Bucket=s3_server.bucket, Key=f"{key}/{name}", Body=book(seed, 4000).encode())
    client.put_object(Bucket=s3_server.bucket, Key=f"{key}/books/sub/", Body=b"")  # a folder marker
    corpus_url, out = storage.join(s3_prefix, "books"), storage.join(s3_prefix, "ds")
    meta = prepare.ensure(corpus_url, out, log=lambda line: None, chunk_chars=1000)
    assert [f["name"] for f in meta["files"]] == ["a.txt", "sub/b.txt"]
    assert all(f["version"] for f in meta["files"])  # ETags
    assert prepare.find_cached(out, corpus_url, prepare.make_options()) == meta
    monkeypatch.setenv("CHARLSTM_CACHE_DIR", str(tmp_path / "cache"))
    ds = prepare.open_local(out)
    texts = [corpus.clean(book(s, 4000)) for s in (1, 2)]
    assert ds.vocab.decode(ds.train) == "\n".join(t[: f["train_chars"]] for t, f in zip(texts, meta["files"],
                                                                                           strict=True))


@pytest.mark.e2e
def test_prepare_to_s3_streams_the_bins_and_a_refusal_leaves_nothing(s3_server, s3_prefix, tmp_path, monkeypatch):
    """An S3 output gets train.bin as a multipart upload written during encoding; a preparation refused after
    encoding (validate) aborts it: no object, no pending upload, nothing under the output."""
    monkeypatch.setattr(storage, "TRANSFER_PART", 5 << 20)
    text = np.random.default_rng(5).choice(np.frombuffer(b"abcdefgh \n", np.uint8), 12 << 20).tobytes().decode()
    path = write(tmp_path / "big.txt", text)
    client = s3_server.client()
    key = s3_prefix.split("/", 3)[3]

    def refuse(meta):
        raise UserError("refused for the test")

    with pytest.raises(UserError, match="refused for the test"):
        prepare.prepare(path, storage.join(s3_prefix, "no"), log=lambda line: None, validate=refuse)
    assert storage.listdir(storage.join(s3_prefix, "no")) == []
    assert client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=key).get("Uploads", []) == []
    meta = prepare.prepare(path, storage.join(s3_prefix, "ds"), log=lambda line: None)
    head = client.head_object(Bucket=s3_server.bucket, Key=f"{key}/ds/train.bin", PartNumber=1)
    assert head["PartsCount"] == 3  # 11.3 MB of uint8 ids in 5 MiB parts
    monkeypatch.setenv("CHARLSTM_CACHE_DIR", str(tmp_path / "cache"))
    ds = prepare.open_local(storage.join(s3_prefix, "ds"))  # (verifies the sha256 of what was streamed)
    assert ds.vocab.decode(ds.train[:1000]) == corpus.clean(text)[:1000]
    assert meta["train_chars"] == len(ds.train)
