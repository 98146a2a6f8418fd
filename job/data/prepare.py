"""The prepare stage: a text corpus -> train.bin, val.bin and meta.json, read by training as np.memmap.

    python -m job.prepare --corpus URL --output URL [--keep-case] [--val-fraction 0.1]
                          [--min-char-count N|auto] [--skip-bad-files] [--force]

The corpus is one file, a folder/prefix (every file below it) or a glob, local, s3:// or https:// (one file).
Each file is cleaned exactly as `corpus.clean` would clean it (decoded strictly as UTF-8, normalised, Project
Gutenberg header and footer removed, trimmed, lowercased unless --keep-case) but as a stream, so memory stays at
a few chunks of CHUNK_CHARS whatever the corpus size. Two passes: pass 1 reads every raw file once, writes the
cleaned text to a local temporary file and counts characters; pass 2 encodes that file with the vocabulary.

Held-out text: the tail of every file (`corpus.split_point` per file), so a folder of books is scored on all of
them rather than on whichever came last in the listing; one file is split exactly as training always did.
val.bin holds, per file, up to VAL_CONTEXT characters before its split (context, never scored) and then the
tail; meta.json's val_segments say where each segment starts and how much of it is context.

Outputs appear atomically and meta.json last: a dataset exists only once its meta.json does. meta.json records
a fingerprint of the corpus listing (names, sizes, versions) and the options, so `ensure` reuses a dataset that
is still current after listing the corpus, without reading any of it.

No TensorFlow here: this runs before (and apart from) training.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import posixpath
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from job.core import guard, storage
from job.core.errors import UserError, run_cli
from job.core.report import format_seconds
from job.data import corpus as corpus_lib
from job.data.corpus import Vocab, extended_vocab

FORMAT = "charlstm-dataset"
FORMAT_VERSION = 1
TRAIN_FILE, VAL_FILE, META_FILE = "train.bin", "val.bin", "meta.json"

VAL_CONTEXT = 1024  # characters of context stored before each held-out tail (never scored)
CHUNK_CHARS = 4 << 20  # characters (and raw bytes) handled at a time: bounds memory, amortises Python overhead
HEAD_CHARS = 1 << 20  # the Gutenberg START marker is looked for in (at least) this much of a file's beginning
BINARY_PROBE = 65536  # NUL bytes in this many leading bytes mean "binary", as corpus.decode decides
AUTO_CHARS_PER_COUNT = 10_000_000  # --min-char-count auto: one required occurrence per 10M corpus chars
FORCE_CUT_CHUNKS = 8  # a text chunk is cut anywhere safe-ish once it reaches this many chunks (see _forced_cut)
MIN_FORCE_CHARS = 1 << 20  # ... and at least this many characters (tests use tiny chunks)
MAX_IDS = 1 << 16  # ids are stored as uint16 at most
# Pass 1 runs in child processes, one file each at a time, once a corpus has several files and this many bytes
# (below it a child's start, about a second, costs more than it saves); at most MAX_WORKERS at once.
PARALLEL_MIN_BYTES = 64 << 20
MAX_WORKERS = 16
# Work folders: inside a local dataset folder (results are renamed into place), else in the system's temp folder.
# Both names carry the preparing process's pid, so a later run can tell an abandoned one (see remove_abandoned).
LOCAL_TEMP_PREFIX, SYSTEM_TEMP_PREFIX = ".prepare-", "charlstm-prepare-"

_SPACE = "\n "  # what corpus.clean strips from both ends of a file
_PHRASE = "project gutenberg"  # in every Gutenberg END marker
NUL = b"\x00"


class BadFileError(UserError):
    """A corpus file that cannot be used as text (empty, binary, not UTF-8, nothing left after cleaning).
    `--skip-bad-files` leaves such files out; any other error (storage, options) always stops the run."""


# ------------------------------------------------------------------------------------------ listing


@dataclass(frozen=True)
class Source:
    url: str
    name: str  # relative to the corpus root ("/"-separated); the basename for a single file
    size: int | None
    version: str | None  # S3 ETag, local mtime_ns, or what the filesystem reports


def _is_http(url: str) -> bool:
    return str(url).lower().startswith(("http://", "https://"))


def list_sources(url: str, exclude: Iterable[str] = ()) -> list[Source]:
    """The files of a corpus, sorted by name: a folder/prefix (trailing "/" or a directory) lists every file
    below it, a URL with `*?[` is a glob unless a file or folder has that very name, anything else is one file
    (https:// always is). Reads no contents.

    Outputs never feed inputs: files below `exclude` (the run's own output and dataset) and below any charlstm
    output or dataset inside the corpus folder are left out, as are FIFOs, devices and sockets (counted)."""
    return _listing(url, exclude)[0]


def _listing(url: str, exclude: Iterable[str] = ()) -> tuple[list[Source], list[str]]:
    """(sources, notes on what was left out)."""
    if _is_http(url):
        entries = [_single(url)]
    elif storage.is_glob(url) and not storage.exists(url):
        entries = storage.glob(url)
    elif url.endswith("/") or storage.info(url)["type"] == "directory":
        entries = storage.walk_files(url)
    else:
        entries = [_single(url)]
    notes = []
    ours = _charlstm_folders(entries, exclude)
    if ours:
        kept = [e for e in entries if not any(_norm(e["url"]).startswith(prefix) for prefix in ours)]
        notes.append(f"left out {len(entries) - len(kept)} file(s) of charlstm outputs or datasets inside the corpus "
                     f"({', '.join(sorted(p.rstrip('/') for p in ours)[:3])})")
        entries = kept
    special = [e["name"] for e in entries if not e.get("regular", True)]
    if special:
        entries = [e for e in entries if e.get("regular", True)]
        notes.append(f"skipped {len(special)} file(s) that are not regular files (FIFO, device or socket): "
                     f"{', '.join(special[:5])}")
    if not entries:
        raise UserError(f"corpus {url}: no files found (names starting with '.' are skipped"
                        f"{'; ' + '; '.join(notes) if notes else ''}); check the URL, folder or glob")
    sources = sorted((Source(e["url"], e["name"], e["size"], e["version"]) for e in entries), key=lambda s: s.name)
    return sources, notes


def _charlstm_folders(entries: list[dict], exclude: Iterable[str]) -> set[str]:
    """Normalised prefixes ("…/", see _norm) of the charlstm locations among a listing: the ones given, and every
    folder holding a dataset (meta.json beside train.bin and val.bin) or an output record (our output.json)."""
    urls = [_norm(e["url"]) for e in entries]
    prefixes = {_norm(u).rstrip("/") + "/" for u in exclude if u}
    by_folder: dict[str, set[str]] = {}
    for url in urls:
        folder, _, name = url.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    for folder, names in by_folder.items():
        if {META_FILE, TRAIN_FILE, VAL_FILE} <= names:
            prefixes.add(folder + "/")
        elif guard.IDENTITY_FILE in names and guard.is_identity_file(storage.join(folder, guard.IDENTITY_FILE)):
            prefixes.add(folder + "/")
    return {p for p in prefixes if any(u.startswith(p) for u in urls)}


def _norm(url: str) -> str:
    """A URL in one form for comparing locations: local paths absolute, others as given."""
    return os.path.abspath(storage.local_path(url)) if storage.is_local(url) else url


def _single(url: str) -> dict:
    details = storage.info(url)
    if details["type"] == "other":
        raise UserError(f"corpus {url} is not a regular file (a FIFO, device or socket), which cannot be read to an "
                        "end; give a text file, a folder or a glob")
    name = posixpath.basename(url.split("?", 1)[0].rstrip("/")) if not storage.is_local(url) else \
        os.path.basename(storage.local_path(url))
    return {"url": url, "name": name, "size": details["size"], "version": details["version"]}


# ---------------------------------------------------------------------------------- streaming clean


def read_chunks(fh, size: int) -> Iterator[bytes]:
    while chunk := fh.read(size):
        yield chunk


def _take_head(chunks: Iterator, size: int) -> list:
    """The first chunks of `chunks` totalling at least `size` (all of them if shorter); the iterator goes on
    from there."""
    head = []
    seen = 0
    for chunk in chunks:
        head.append(chunk)
        seen += len(chunk)
        if seen >= size:
            break
    return head


def decode_utf8(raw: Iterable[bytes], source: str) -> Iterator[str]:
    """Strict incremental UTF-8 decoding with corpus.decode's checks and messages: NUL bytes in the first
    BINARY_PROBE bytes mean binary (checked before any decoding, as there), a bad byte is named with its offset."""
    chunks = iter(raw)
    head = _take_head(chunks, BINARY_PROBE)
    start = b"".join(head)[:BINARY_PROBE]
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BadFileError(f"corpus file {source} is UTF-16 text (it starts with a UTF-16 byte-order mark); convert "
                           "it, e.g. iconv -f utf-16 -t utf-8 (or pass --skip-bad-files to leave it out)")
    if b"\x00" in start:
        raise BadFileError(f"corpus file {source} looks binary (NUL bytes; or UTF-16/32 text without a byte-order "
                           "mark); give plain UTF-8 text files (or pass --skip-bad-files to leave such files out)")
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    fed = 0  # bytes given to the decoder so far
    for chunk in itertools.chain(head, chunks, [None]):
        if chunk and b"\x00" in chunk:  # past the probe: text with a NUL in it is damaged, not a new character
            raise BadFileError(f"corpus file {source} has a NUL byte at offset {fed + chunk.index(NUL)}; "
                               "give plain UTF-8 text (or pass --skip-bad-files to leave it out)")
        pending = len(decoder.getstate()[0])  # bytes of an unfinished character carried from the last call
        try:
            text = decoder.decode(chunk or b"", final=chunk is None)
        except UnicodeDecodeError as exc:
            offset = fed - pending + exc.start
            raise BadFileError(
                f"corpus file {source} is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {offset}); "
                "convert it, e.g. iconv -f latin1 -t utf-8 (or pass --skip-bad-files to leave it out)"
            ) from None
        fed += len(chunk or b"")
        if text:
            yield text


def normalise_stream(pieces: Iterable[str], file_start: bool = True) -> Iterator[str]:
    """corpus.normalise on a stream: a leading BOM dropped (at a file's start), CRLF and lone CR -> LF. A CR at
    the end of a piece waits for the next one, which may start with the LF of the same CRLF pair."""
    first = file_start
    carry = ""
    for piece in pieces:
        if first and piece:
            first = False
            if piece.startswith("\ufeff"):
                piece = piece[1:]
        piece = carry + piece
        carry = "\r" if piece.endswith("\r") else ""
        if carry:
            piece = piece[:-1]
        if "\r" in piece:
            piece = piece.replace("\r\n", "\n").replace("\r", "\n")
        if piece:
            yield piece
    if carry:
        yield "\n"


def _safe_line(line: str) -> bool:
    """A line no END-marker match can run through. The marker regex spans lines only through its `\\s*` parts,
    so the lines a match covers before its last one are blank or hold just "***"; any other line ends matches.
    (str.strip and the regex's \\s use the same Unicode whitespace.)"""
    stripped = line.strip()
    return bool(stripped) and stripped != "***"


def _cut(text: str) -> int:
    """The last position after a newline ending a _safe_line (0: none), so that regex searches of the pieces
    on either side find exactly the matches a search of the whole text finds."""
    nl = text.rfind("\n")
    while nl >= 0:
        prev = text.rfind("\n", 0, nl)
        if _safe_line(text[prev + 1: nl]):
            return nl + 1
        nl = prev
    return 0


def _forced_cut(text: str) -> int:
    """Where to cut a chunk that has grown to FORCE_CUT_CHUNKS without a safe line end: only runs of blank
    lines or lines longer than that get here. Cutting next to "\\n" or " " keeps lowercasing exact (the final
    sigma rule does not look across them); an END marker spanning the cut would be missed."""
    for sep in ("\n", " "):
        at = text.rfind(sep)
        if at > 0:
            return at + 1
    return len(text)


def line_chunks(pieces: Iterable[str], chunk_chars: int) -> Iterator[str]:
    """Regroup text into chunks of about `chunk_chars` (more if a line is longer), cut only at safe line ends."""
    buf: list[str] = []
    size = 0
    threshold = chunk_chars
    force = max(FORCE_CUT_CHUNKS * chunk_chars, MIN_FORCE_CHARS)
    for piece in pieces:
        buf.append(piece)
        size += len(piece)
        if size < threshold:
            continue
        text = "".join(buf)
        at = _cut(text) or (_forced_cut(text) if size >= force else 0)
        if at:
            yield text[:at]
            text = text[at:]
            threshold = len(text) + chunk_chars
        else:
            threshold = min(2 * size, force)  # doubling keeps the re-scans linear overall
        buf = [text] if text else []
        size = len(text)
    if buf:
        yield "".join(buf)


def strip_gutenberg_stream(chunks: Iterable[str], head_chars: int,
                           on_end: Callable[[], None] | None = None) -> Iterator[str]:
    """corpus.strip_gutenberg on safe-cut chunks: the START marker is looked for in the first chunks totalling
    at least `head_chars` (a START further in is not seen), then text flows until the first END marker. The
    rest of the file is still consumed, so it is decoded (a bad byte after the footer is still an error, as in
    corpus.clean) and hashed."""
    chunks = iter(chunks)
    head = _take_head(chunks, head_chars)
    text = "".join(head)
    start = corpus_lib._START.search(text)
    if start:
        text = text[start.end():]  # the END search below starts here, as corpus.strip_gutenberg's does
    for chunk in itertools.chain([text], chunks):
        end = find_end(chunk)
        if end:
            yield chunk[: end.start()]
            if on_end is not None:
                on_end()
            for _ in chunks:
                pass
            return
        yield chunk


def find_end(chunk: str) -> re.Match | None:
    """corpus_lib._END.search(chunk), run only around the lines that can hold a marker. Every form of it has
    "Project Gutenberg" (ASCII letters, which lowercase only to themselves) on its last line, and may start
    earlier only over blank or "***" lines: so the marker search runs from there to that line's end, for each
    such line in order; a chunk without the phrase costs one lower() instead of a scan of every line start."""
    low = chunk.lower()
    if len(low) != len(chunk):  # a character lowercased to two (e.g. "İ"): positions in `low` would be off
        return corpus_lib._END.search(chunk) if _PHRASE in low else None
    at = low.find(_PHRASE)
    while at >= 0:
        start = chunk.rfind("\n", 0, at) + 1
        end = chunk.find("\n", at)
        end = len(chunk) if end < 0 else end
        while start > 0:  # back over the lines a marker's leading \s* and "***" may span
            prev = chunk.rfind("\n", 0, start - 1) + 1
            if _safe_line(chunk[prev: start - 1]):
                break
            start = prev
        found = corpus_lib._END.search(chunk, start, end)
        if found:
            return found
        at = low.find(_PHRASE, end)
    return None


def trim_stream(pieces: Iterable[str]) -> Iterator[str]:
    """`.strip("\\n ") + "\\n"` on a stream: leading newlines/spaces dropped, a trailing run of them held back
    until text follows it (so dropped at the end), and exactly one final newline. Every piece yielded starts and
    ends next to a newline/space or an end of the text, which keeps per-piece lowercasing exact."""
    leading = True
    held: list[str] = []
    for piece in pieces:
        if leading:
            piece = piece.lstrip(_SPACE)
            if not piece:
                continue
            leading = False
        body = piece.rstrip(_SPACE)
        if body:
            yield from held
            held = []
            yield body
            if len(body) < len(piece):
                held.append(piece[len(body):])
        else:
            held.append(piece)
    yield "\n"


def clean_stream(raw: Iterable[bytes], source: str, lowercase: bool = True, chunk_chars: int = CHUNK_CHARS,
                 head_chars: int = HEAD_CHARS) -> Iterator[str]:
    """The cleaned text of one file, in pieces whose concatenation is `corpus.clean(corpus.decode(raw bytes))`
    (given a START marker, if any, within `head_chars`). Raises BadFileError for binary or non-UTF-8 input."""
    text = normalise_stream(decode_utf8(raw, source))
    pieces = trim_stream(strip_gutenberg_stream(line_chunks(text, chunk_chars), head_chars))
    return (p.lower() for p in pieces) if lowercase else pieces


# ---------------------------------------------------------------------------- pass 1, one file in parts
# A file larger than SPLIT_BYTES is cleaned in byte ranges side by side. Each range ends just after a line that
# no END marker can run through (see _safe_line), so every search of the pieces finds what a search of the whole
# finds; the first range holds the file's start (BOM, binary probe, Gutenberg START within the head), a later
# range cleans from its first byte on, and the parent joins them: ranges after the first END marker dropped, the
# ends trimmed, one final newline, the counts corrected. The file's sha256 is read beside them. A range that
# meets a bad byte, or a first range shorter than the head, sends the file through the serial path instead, so
# verdicts and their messages are the serial ones.

SPLIT_BYTES = 64 << 20
_CUT_WINDOW = 1 << 20  # bytes searched after a target offset for a safe line end (none: no cut there)


def split_points(read_at: Callable[[int, int], bytes], size: int, part: int) -> list[int]:
    """Byte offsets (0 first, `size` last) cutting a file into ranges of about `part` bytes, each cut just after
    the newline ending a safe line. `read_at(offset, n)` reads raw bytes."""
    cuts = [0]
    for target in range(part, size, part):
        if target <= cuts[-1]:
            continue
        back = min(target, _CUT_WINDOW)
        window = read_at(target - back, back + _CUT_WINDOW)
        at = window.find(b"\n", back)
        while 0 <= at < len(window) - 1:
            line_start = window.rfind(b"\n", 0, at) + 1
            if (line_start > 0 or target == back) and _raw_line_safe(window[line_start:at]):
                cuts.append(target - back + at + 1)
                break
            at = window.find(b"\n", at + 1)
    return [*cuts, size] if cuts[-1] < size else cuts


def _raw_line_safe(raw: bytes) -> bool:
    """_safe_line of the last line the raw bytes before a newline make once CR/CRLF are normalised."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\x00" not in text and _safe_line(text.removesuffix("\r").rsplit("\r", 1)[-1])


@dataclass
class _Part:
    path: str
    nbytes: int
    chars: int
    counts: np.ndarray | None
    blank: bool  # the raw bytes are whitespace only
    has_text: bool
    ended: bool  # an END marker was found in it (the text stops there)
    bad: bool  # a bad byte, or the head did not fit: clean the file serially instead


def _clean_part(source: Source, start: int, end: int, path: str, *, lowercase: bool, chunk_chars: int,
                head_chars: int, progress: Callable[[int], None] | None = None) -> _Part:
    """Clean bytes [start, end) of one file into `path` as a range of the split path (see above)."""
    part = _Part(path, 0, 0, None, True, False, False, False)
    with open(path, "wb") as out, storage.open_read(source.url) as fh:
        fh.seek(start)
        tap = _RawTap(prefetched(_read_range(fh, end - start, chunk_chars)), progress)
        try:
            if start == 0:
                head = _Counted(line_chunks(normalise_stream(decode_utf8(tap, source.url)), chunk_chars))
                pieces = strip_gutenberg_stream(head, head_chars, on_end=lambda: setattr(part, "ended", True))
            else:
                head = None
                pieces = _until_end(line_chunks(normalise_stream(_decode_range(tap), file_start=False), chunk_chars),
                                    part)
            for piece in pieces:
                piece = piece.lower() if lowercase else piece
                data = piece.encode("utf-8")
                out.write(data)
                part.nbytes += len(data)
                part.chars += len(piece)
                part.has_text = part.has_text or bool(piece.strip())
                part.counts = _add_counts(part.counts, np.bincount(corpus_lib.code_points(piece)))
        except BadFileError:
            part.bad = True
            return part
        if head is not None and not head.head_before_last(head_chars):
            part.bad = True  # the head took the range's last chunk: the serial head may be longer
    part.blank = tap.blank
    return part


class _Counted:
    """The chunks of a first range, their lengths noted."""

    def __init__(self, chunks: Iterator[str]):
        self.chunks, self.lengths = chunks, []

    def __iter__(self) -> Iterator[str]:
        for chunk in self.chunks:
            self.lengths.append(len(chunk))
            yield chunk

    def head_before_last(self, head_chars: int) -> bool:
        """Whether the head (the first chunks totalling head_chars) ends before the range's last chunk, which
        line_chunks cut only because the range ended: then the serial path's head is the same."""
        total = 0
        for i, n in enumerate(self.lengths):
            total += n
            if total >= head_chars:
                return i < len(self.lengths) - 1
        return False


def _until_end(chunks: Iterable[str], part: _Part) -> Iterator[str]:
    """The text of a later range up to its first END marker (the rest still read: it is decoded and counted as
    raw bytes, as the serial path reads a file to its end)."""
    chunks = iter(chunks)
    for chunk in chunks:
        found = find_end(chunk)
        if found:
            part.ended = True
            yield chunk[: found.start()]
            for _ in chunks:
                pass
            return
        yield chunk


def _decode_range(raw: Iterable[bytes]) -> Iterator[str]:
    """Strict UTF-8 of a range that starts at a line start; a NUL or bad byte is a BadFileError (whose words do
    not matter: the file is then cleaned serially, which words the verdict)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    for chunk in itertools.chain(raw, [None]):
        if chunk and NUL in chunk:
            raise BadFileError("NUL")
        try:
            text = decoder.decode(chunk or b"", final=chunk is None)
        except UnicodeDecodeError:
            raise BadFileError("not UTF-8") from None
        if text:
            yield text


# ----------------------------------------------------------------------------------------- pass 1


class _RawTap:
    """Hashes and measures raw bytes as they stream past, and notes whether any is not whitespace."""

    def __init__(self, chunks: Iterable[bytes], progress: Callable[[int], None] | None = None):
        self.chunks = chunks
        self.progress = progress
        self.sha = hashlib.sha256()
        self.size = 0
        self.blank = True

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.sha.update(chunk)
            self.size += len(chunk)
            if self.blank and chunk.strip():
                self.blank = False
            if self.progress is not None:
                self.progress(len(chunk))
            yield chunk


def _add_counts(total: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """total + counts (both indexed by code point), growing `total` only as far as the largest code point seen
    (a full 0x110000 array per file would cost 9 MB each)."""
    if total is None or len(total) < len(counts):
        grown = np.zeros(len(counts), np.int64)
        if total is not None:
            grown[: len(total)] = total
        total = grown
    total[: len(counts)] += counts
    return total


@dataclass
class _Cleaned:
    source: Source
    segments: list[tuple[str, int, int]]  # (temporary file, byte offset, bytes): where its cleaned text is, in order
    nbytes: int
    chars: int
    raw_size: int
    sha256: str  # of the raw bytes
    counts: np.ndarray | None  # character counts by code point; moved into the corpus total once the file is done


def _clean_file(source: Source, out, *, lowercase: bool, chunk_chars: int, head_chars: int,
                progress: Callable[[int], None] | None = None) -> _Cleaned:
    """Stream one file through clean_stream into `out` (UTF-8). On BadFileError the caller rolls `out` back.
    `progress(n)` is told of every n raw bytes read."""
    offset = out.tell()
    nbytes = chars = 0
    has_text = False
    counts = None
    with storage.open_read(source.url) as fh:
        tap = _RawTap(prefetched(read_chunks(fh, chunk_chars)), progress)
        for piece in clean_stream(tap, source.url, lowercase, chunk_chars, head_chars):
            data = piece.encode("utf-8")
            out.write(data)
            nbytes += len(data)
            chars += len(piece)
            if not has_text and piece.strip():
                has_text = True
            counts = _add_counts(counts, np.bincount(corpus_lib.code_points(piece)))
    if tap.blank:
        raise BadFileError(f"corpus file {source.url} is empty; give text files with some content "
                           "(or pass --skip-bad-files to leave it out)")
    if not has_text:
        raise BadFileError(f"corpus file {source.url} has no text once Project Gutenberg boilerplate is removed "
                           "(or pass --skip-bad-files to leave it out)")
    return _Cleaned(source, [(out.name, offset, nbytes)], nbytes, chars, tap.size, tap.sha.hexdigest(), counts)


def _clean_all(sources: list[Source], folder: str, *, lowercase: bool, skip_bad_files: bool, chunk_chars: int,
               head_chars: int, workers: int, progress: Progress) -> tuple[list[_Cleaned], list[dict], np.ndarray]:
    """Pass 1: every file cleaned into temporary files in `folder`: one after another into one file, or with
    `workers` > 1 each file into its own, `workers` files at a time in child processes. Both give the same
    cleaned text, counts and verdicts (a bad file is reported in listing order). Returns the files used, the
    files skipped and the character counts of all used files (indexed by code point)."""
    cleaned: list[_Cleaned] = []
    skipped: list[dict] = []
    counts: np.ndarray | None = None
    for source, outcome in _cleaned_files(sources, folder, lowercase=lowercase, chunk_chars=chunk_chars,
                                          head_chars=head_chars, workers=workers, progress=progress):
        if isinstance(outcome, BadFileError):
            if not skip_bad_files:
                raise outcome
            skipped.append({"name": source.name, "reason": str(outcome)})
            continue
        counts = _add_counts(counts, outcome.counts)
        outcome.counts = None  # one array for the corpus, not one per file
        cleaned.append(outcome)
    if not cleaned:
        raise UserError(f"no usable corpus file: all {len(sources)} were skipped ({skipped[0]['reason']})")
    return cleaned, skipped, counts


def _cleaned_files(sources: list[Source], folder: str, *, workers: int, progress: Progress,
                   **clean: Any) -> Iterator[tuple[Source, _Cleaned | BadFileError]]:
    """(source, its _Cleaned or the BadFileError that refused it), in listing order."""
    if workers <= 1:
        with open(os.path.join(folder, "cleaned.txt"), "wb") as out:
            for source in sources:
                yield source, _clean_serially(source, out, progress.add, clean)
                progress.maybe_log()
        return
    plans = [_plan(source, i, folder) for i, source in enumerate(sources)]
    if len(plans) == 1 and len(plans[0]) == 1:  # one small file: nothing to do side by side
        yield from _cleaned_files(sources, folder, workers=1, progress=progress, **clean)
        return
    jobs = [(source, *job, clean) for source, plan in zip(sources, plans, strict=True) for job in plan]
    context = multiprocessing.get_context("spawn")  # no fork: the driver may already hold Ray's and s3fs's threads
    read = context.Value("q", 0)
    pool = context.Pool(min(workers, len(jobs)), initializer=_init_child, initargs=(read,))
    hashing = ThreadPoolExecutor(1, thread_name_prefix="charlstm-hash")  # split files' sha256, beside the parts
    stop = threading.Event()
    try:
        digests = [hashing.submit(_sha256_of, s.url, stop) if len(plan) > 1 else None
                   for s, plan in zip(sources, plans, strict=True)]
        results = pool.imap(_clean_in_child, jobs)  # in listing order, computed `workers` at a time
        for index, (source, plan, digest) in enumerate(zip(sources, plans, digests, strict=True)):
            outcomes = []
            for _ in plan:
                while True:
                    try:
                        outcomes.append(results.next(timeout=progress.wait()))
                        break
                    except multiprocessing.TimeoutError:
                        progress.set(read.value)
                        progress.maybe_log()
                progress.set(read.value)
                progress.maybe_log()
            if digest is None:
                yield source, outcomes[0]
                continue
            joined = _join_parts(source, outcomes, digest.result(), folder)
            if joined is None:  # a bad byte, a blank file or a head longer than the first part: serially
                with open(os.path.join(folder, f"serial-{index:06d}.txt"), "wb") as out:
                    joined = _clean_serially(source, out, None, clean)
            yield source, joined
        pool.close()
    finally:
        stop.set()  # a hash still reading stops at its next chunk (a stop or an error must not wait for it)
        hashing.shutdown(wait=True, cancel_futures=True)
        pool.terminate()  # on an error or a stop: no child outlives the preparation
        pool.join()


def _clean_serially(source: Source, out, progress: Callable[[int], None] | None,
                    clean: dict) -> _Cleaned | BadFileError:
    start = out.tell()
    try:
        return _clean_file(source, out, progress=progress, **clean)
    except BadFileError as exc:
        out.seek(start)  # nothing of a bad file stays behind
        out.truncate()
        return exc


def _plan(source: Source, index: int, folder: str) -> list[tuple[int, int, str]]:
    """The child jobs for one file: (start, end, temporary file) per part; (0, -1, file) for a whole file."""
    if not source.size or source.size <= SPLIT_BYTES:
        return [(0, -1, os.path.join(folder, f"cleaned-{index:06d}.txt"))]
    with storage.open_read(source.url) as fh:

        def read_at(offset: int, n: int) -> bytes:
            fh.seek(offset)
            return fh.read(n)

        cuts = split_points(read_at, source.size, SPLIT_BYTES)
    return [(a, b, os.path.join(folder, f"cleaned-{index:06d}-{j:05d}.txt"))
            for j, (a, b) in enumerate(itertools.pairwise(cuts))]


def _sha256_of(url: str, stop: threading.Event) -> str:
    h = hashlib.sha256()
    with storage.open_read(url) as fh:
        for chunk in read_chunks(fh, 8 << 20):
            if stop.is_set():
                return ""
            h.update(chunk)
    return h.hexdigest()


def _join_parts(source: Source, parts: list[_Part], sha256: str, folder: str) -> _Cleaned | None:
    """One file's parts as the serial path would have cleaned it (None: let the serial path decide)."""
    if any(p.bad for p in parts) or all(p.blank for p in parts):
        return None
    kept = parts[: next((i + 1 for i, p in enumerate(parts) if p.ended), len(parts))]
    if not any(p.has_text for p in kept):
        return None
    segments = [[p.path, 0, p.nbytes] for p in kept if p.nbytes]
    counts: np.ndarray | None = None
    for p in kept:
        if p.counts is not None:
            counts = _add_counts(counts, p.counts)
    stripped = b""
    while segments:  # leading newlines and spaces, over as many parts as they run
        lead = _space_run(*segments[0], from_end=False)
        stripped += lead
        segments[0][1] += len(lead)
        segments[0][2] -= len(lead)
        if segments[0][2]:
            break
        segments.pop(0)
    while segments:  # and trailing ones
        tail = _space_run(*segments[-1], from_end=True)
        stripped += tail
        segments[-1][2] -= len(tail)
        if segments[-1][2]:
            break
        segments.pop()
    newline = os.path.join(folder, "newline.txt")
    if not os.path.exists(newline):
        with open(newline, "wb") as fh:
            fh.write(b"\n")
    counts = _add_counts(counts, np.zeros(ord(" ") + 1, np.int64))
    counts[ord("\n")] += 1 - stripped.count(b"\n")
    counts[ord(" ")] -= stripped.count(b" ")
    nbytes = sum(n for _, _, n in segments) + 1
    return _Cleaned(source, [*(tuple(seg) for seg in segments), (newline, 0, 1)], nbytes,
                    sum(p.chars for p in kept) - len(stripped) + 1, source.size, sha256, counts)


def _space_run(path: str, offset: int, nbytes: int, from_end: bool, block: int = 1 << 20) -> bytes:
    """The run of b"\n" and b" " at the start (or end) of bytes [offset, offset + nbytes) of `path`."""
    run = b""
    with open(path, "rb") as fh:
        while len(run) < nbytes:
            n = min(block, nbytes - len(run))
            fh.seek(offset + nbytes - len(run) - n if from_end else offset + len(run))
            data = fh.read(n)
            kept = data.rstrip(_SPACE.encode()) if from_end else data.lstrip(_SPACE.encode())
            run = (data[len(kept):] + run) if from_end else (run + data[: len(data) - len(kept)])
            if kept:
                break
    return run


_CHILD_READ: Any = None  # a child's shared counter of raw bytes read, for the parent's progress lines


def _init_child(read: Any) -> None:
    global _CHILD_READ
    _CHILD_READ = read


def _count_read(n: int) -> None:
    with _CHILD_READ.get_lock():
        _CHILD_READ.value += n


def _clean_in_child(job: tuple[Source, int, int, str, dict]) -> _Cleaned | _Part | BadFileError:
    source, start, end, path, clean = job
    if end >= 0:
        return _clean_part(source, start, end, path, progress=_count_read, **clean)
    with open(path, "wb") as out:
        try:
            return _clean_file(source, out, progress=_count_read, **clean)
        except BadFileError as exc:
            outcome = exc
    os.unlink(path)
    return outcome


class Progress:
    """Progress lines of a long preparation (done / total, rate, eta) at most every `every` seconds (0: never)."""

    def __init__(self, what: str, total: int | None, every: float, log: Callable[[str], None], unit: str = "read"):
        self.what, self.total, self.every, self.log, self.unit = what, total, every, log, unit
        self.started = self.since = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def set(self, done: int) -> None:
        self.done = done

    def wait(self) -> float:
        """Seconds until the next line is due (a long wait when none will be)."""
        return max(0.05, self.every - (time.monotonic() - self.since)) if self.every > 0 else 3600.0

    def maybe_log(self) -> None:
        now = time.monotonic()
        if self.every <= 0 or now - self.since < self.every:
            return
        self.since = now
        self.log(progress_line(self.what, self.unit, self.done, self.total, now - self.started))


def progress_line(what: str, unit: str, done: int, total: int | None, elapsed: float) -> str:
    """E.g. "preparing s3://b/books/: read 1.2 GB of 10.0 GB (12%), 95 MB/s, eta 1:33"."""
    rate = done / max(elapsed, 1e-9)
    line = f"preparing {what}: {unit} {_gb(done)}"
    if total:
        line += f" of {_gb(total)} ({100 * done / total:.0f}%)"
    line += f", {rate / 1e6:,.0f} MB/s"
    if total and rate > 0:
        line += f", eta {format_seconds(max(0.0, total - done) / rate)}"
    return line


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def usable_cores() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup (v2) CPU quota as a container's limit sets."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    return cores


def auto_workers(sources: list[Source]) -> int:
    """Child processes for pass 1: one per usable core (at most MAX_WORKERS) when there are enough bytes to
    repay a child's start (about a second each) and several files or parts of one; else the serial path."""
    known = sum(s.size or 0 for s in sources)
    jobs = sum(max(1, -(-(s.size or 0) // SPLIT_BYTES)) for s in sources)
    if jobs < 2 or known < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(usable_cores(), MAX_WORKERS, jobs))


def prefetched(chunks: Iterator[bytes], depth: int = 2) -> Iterator[bytes]:
    """`chunks`, read up to `depth` ahead in a thread: the next read (an S3 ranged GET, a disk read) overlaps
    the cleaning of the current chunk. Memory: `depth` + 1 chunks."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        """Queue `item` unless the consumer has stopped reading (then False)."""
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for chunk in chunks:
                if not put(chunk):
                    return
            item: Any = end
        except BaseException as exc:  # handed to the consumer, raised where it reads
            item = exc
        put(item)

    thread = threading.Thread(target=reader, name="charlstm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ahead.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------ split and vocabulary


def plan_splits(lengths: list[int], val_fraction: float) -> list[int]:
    """Where each file's held-out tail starts (== its length: no tail). One file: corpus.split_point, exactly
    as training always split a corpus. Several: the same rule per file, but a file whose training part would be
    shorter than VAL_CONTEXT + 2 characters goes wholly to training (its tail would have little context)."""
    if len(lengths) == 1:
        return [corpus_lib.split_point(lengths[0], val_fraction)]
    splits = []
    for n in lengths:
        split = corpus_lib.split_point(n, val_fraction)
        splits.append(split if split >= VAL_CONTEXT + 2 else n)
    return splits


def resolve_min_char_count(min_char_count: int | str | None, total_chars: int) -> int:
    """"auto" (or None): one required occurrence per AUTO_CHARS_PER_COUNT characters, at least 1, so a corpus
    under 20M characters keeps every character it has."""
    if min_char_count in (None, "auto"):
        return max(1, total_chars // AUTO_CHARS_PER_COUNT)
    return int(min_char_count)


def dtype_for(vocab_size: int) -> str:
    return "uint8" if vocab_size <= 256 else "uint16"


# ----------------------------------------------------------------------------------------- pass 2


def _file_ids(item: _Cleaned, table: np.ndarray, dtype: str, chunk_bytes: int,
              progress: Progress) -> Iterator[np.ndarray]:
    """The ids of one file's cleaned text, read back from its temporary file(s) in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    left = item.nbytes
    for path, offset, nbytes in item.segments:
        with open(path, "rb") as src:
            src.seek(offset)
            for data in prefetched(_read_range(src, nbytes, chunk_bytes)):
                left -= len(data)
                progress.add(len(data))
                progress.maybe_log()
                text = decoder.decode(data, final=not left)
                if text:
                    yield table[corpus_lib.code_points(text)].astype(dtype)


def _read_range(fh, nbytes: int, size: int) -> Iterator[bytes]:
    """The next `nbytes` of `fh`, `size` at a time."""
    while nbytes > 0:
        data = fh.read(min(size, nbytes))
        if not data:
            raise OSError(f"{fh.name} ended {nbytes} bytes early")
        nbytes -= len(data)
        yield data


def _encode_all(items: list[_Cleaned], splits: list[int], vocab: Vocab, dtype: str, train_sink, val_sink,
                chunk_chars: int, progress: Progress) -> tuple[int, int, list[list[int]], dict[str, str]]:
    """Pass 2: train.bin = every file's training part, a blank line between files; val.bin = per file with a
    tail, up to VAL_CONTEXT chars before its split and then the tail. Returns (train chars, val chars,
    val_segments)."""
    table = vocab.lookup_table
    separator = table[[ord("\n")]].astype(dtype).tobytes()  # files end with "\n": one more makes a blank line
    train_pos = val_pos = 0
    segments: list[list[int]] = []
    train, val = _Hashing(train_sink), _Hashing(val_sink)
    for i, (item, split) in enumerate(zip(items, splits, strict=True)):
        if i:
            train.write(separator)
            train_pos += 1
        context_start = max(0, split - VAL_CONTEXT) if split < item.chars else item.chars
        if split < item.chars:
            segments.append([val_pos, split - context_start, item.chars - split])
        pos = 0
        for ids in _file_ids(item, table, dtype, chunk_chars, progress):
            end = pos + len(ids)
            if pos < split:
                part = ids[: split - pos]
                train.write(part.tobytes())
                train_pos += len(part)
            if end > context_start:
                part = ids[max(0, context_start - pos):]
                val.write(part.tobytes())
                val_pos += len(part)
            pos = end
    return train_pos, val_pos, segments, {TRAIN_FILE: train.sha.hexdigest(), VAL_FILE: val.sha.hexdigest()}


class _Hashing:
    """A sink (a file, a storage.Upload) that hashes what is written to it (the checksums cost no extra pass)."""

    def __init__(self, sink):
        self.sink = sink
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        self.sink.write(data)


def file_sha256(path: str, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def meta_checksum(meta: dict) -> str:
    """sha256 of meta.json's contents other than this checksum: an edited meta.json (its vocabulary, its sizes)
    is told from a prepared one."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ------------------------------------------------------------------------------------ fingerprint


def make_options(lowercase: bool = True, val_fraction: float = 0.1, min_char_count: int | str | None = None,
                 skip_bad_files: bool = False, base_vocab: Vocab | None = None, new_to_unknown: bool = False) -> dict:
    """The options that decide a dataset's contents, normalised (min_char_count None -> "auto") and checked.
    `base_vocab` (fine-tuning): the parent's vocabulary comes first, ids unchanged; the characters it lacks are
    appended, or with `new_to_unknown` share the unknown id (job.data.corpus.extended_vocab)."""
    if not 0.0 < float(val_fraction) <= 0.5:
        raise UserError(f"--val-fraction must be in (0, 0.5] (got {val_fraction})")
    if min_char_count in (None, "auto"):
        min_char_count = "auto"
    else:
        try:
            min_char_count = int(min_char_count)
        except (TypeError, ValueError):
            min_char_count = 0
        if min_char_count < 1:
            raise UserError(f"--min-char-count must be a whole number >= 1 or 'auto' (got {min_char_count!r})")
    options = {"lowercase": bool(lowercase), "val_fraction": float(val_fraction), "min_char_count": min_char_count,
               "skip_bad_files": bool(skip_bad_files)}
    if base_vocab is not None:  # only then: the fingerprints of other datasets stay what they were
        blob = json.dumps([list(base_vocab.chars), base_vocab.has_unknown], ensure_ascii=True).encode()
        options["base_vocab"] = {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(base_vocab),
                                 "new_chars": "unknown" if new_to_unknown else "append"}
    return options


def fingerprint(sources: list[Source], options: dict) -> str:
    """sha256 of the format, the listing (names, sizes, versions) and the options: what decides the output,
    known without reading the corpus."""
    listing = [[s.name, s.size, s.version] for s in sources]
    blob = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "files": listing, "options": options},
                      sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _corpus_sha256(items: list[_Cleaned]) -> str:
    """sha256 over each used file's relative name and the sha256 of its raw bytes, in listing order."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.source.name}\0{item.sha256}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- prepare


@contextlib.contextmanager
def _staging(output_url: str) -> Iterator[str]:
    """A temporary folder for the work: inside a local output folder (the results are then renamed into place,
    not copied), else the system's. If the work fails, the folders made for it go too: a refused corpus leaves
    nothing in --output."""
    if not storage.is_local(output_url):
        with tempfile.TemporaryDirectory(prefix=f"{SYSTEM_TEMP_PREFIX}{os.getpid()}-") as tmp:
            yield tmp
        return
    folder = os.path.abspath(storage.local_path(output_url))
    created, parent = [], folder
    while not os.path.exists(parent):
        created.append(parent)  # deepest first
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    done = False
    try:
        with tempfile.TemporaryDirectory(prefix=f"{LOCAL_TEMP_PREFIX}{os.getpid()}-", dir=folder) as tmp:
            yield tmp
        done = True
    finally:
        for path in created if not done else []:
            try:
                os.rmdir(path)
            except OSError:
                break  # not empty: something else wrote there


class _Bins:
    """Where pass 2 writes train.bin and val.bin. An S3 output: uploads whose parts go up while pass 2 runs (no
    local copy), completed by `publish` and aborted if the preparation fails before it. Otherwise files in the
    work folder, renamed into place (local) or uploaded (other filesystems) by `publish`. `publish` writes the
    .bin files first and meta.json last, each atomically; a previous meta.json goes first of all, so a reader
    never pairs it with the new .bin files."""

    def __init__(self, tmp: str, output_url: str, expected_bytes: int):
        self.tmp, self.output_url, self.expected = tmp, output_url, expected_bytes
        self.sinks: dict[str, Any] = {}
        self.published = False

    def __enter__(self) -> _Bins:
        for name in (TRAIN_FILE, VAL_FILE):
            if storage.is_s3(self.output_url):
                self.sinks[name] = storage.Upload(storage.join(self.output_url, name), self.expected)
            else:
                self.sinks[name] = open(os.path.join(self.tmp, name), "wb")  # noqa: SIM115 - closed in __exit__
        return self

    def publish(self, meta: dict) -> None:
        storage.delete(storage.join(self.output_url, META_FILE))
        for name, sink in self.sinks.items():
            if isinstance(sink, storage.Upload):
                sink.commit()
                continue
            sink.close()
            if storage.is_local(self.output_url):
                os.replace(os.path.join(self.tmp, name), os.path.join(storage.local_path(self.output_url), name))
            else:  # another fsspec filesystem
                storage.upload_file(os.path.join(self.tmp, name), storage.join(self.output_url, name))
        self.published = True
        storage.write_text(storage.join(self.output_url, META_FILE),
                           json.dumps(meta, ensure_ascii=False, indent=1) + "\n")

    def __exit__(self, *exc: object) -> None:
        for sink in self.sinks.values():
            if isinstance(sink, storage.Upload):
                if not self.published:
                    sink.abort()
            else:
                sink.close()


def prepare(corpus_url: str, output_url: str, *, lowercase: bool = True, val_fraction: float = 0.1,
            min_char_count: int | str | None = None, skip_bad_files: bool = False,
            log: Callable[[str], None] = print, chunk_chars: int = CHUNK_CHARS,
            head_chars: int = HEAD_CHARS, validate: Callable[[dict], None] | None = None,
            exclude: Iterable[str] = (), base_vocab: Vocab | None = None, new_to_unknown: bool = False,
            workers: int | None = None, log_every: float = 30.0) -> dict:
    """Clean, split and encode the corpus at `corpus_url` into `output_url`; returns meta.json's contents. Files
    below `output_url` and `exclude` (and other charlstm locations) are never read as corpus. `workers`: child
    processes cleaning files side by side (None: auto_workers; 1: this process only); the dataset is the same byte
    for byte. A progress line at most every `log_every` seconds (0: none).

    `validate(meta)` may refuse the result (raise UserError) before anything is published: a corpus too short
    for the training settings leaves nothing in the output."""
    started = time.monotonic()
    options = make_options(lowercase, val_fraction, min_char_count, skip_bad_files, base_vocab, new_to_unknown)
    sources = _writable_and_listed(corpus_url, output_url, exclude, log)
    workers = auto_workers(sources) if workers is None else workers
    reading = Progress(corpus_url, _listed_size(sources), log_every, log)
    with _staging(output_url) as tmp, contextlib.ExitStack() as stack:
        items, skipped, counts = _clean_all(sources, tmp, lowercase=lowercase, skip_bad_files=skip_bad_files,
                                            chunk_chars=chunk_chars, head_chars=head_chars, workers=workers,
                                            progress=reading)
        counts = _with_separators(counts, len(items))
        total = int(counts.sum())
        resolved = resolve_min_char_count(options["min_char_count"], total)
        vocab, added, unknown = _choose_vocab(counts, resolved, base_vocab, new_to_unknown)
        splits = plan_splits([i.chars for i in items], val_fraction)
        _check_held_out(items, splits, total, val_fraction)
        dtype = dtype_for(len(vocab))
        encoding = Progress(corpus_url, sum(i.nbytes for i in items), log_every, log, unit="encoded")
        bins = stack.enter_context(_Bins(tmp, output_url, (total + len(items)) * np.dtype(dtype).itemsize))
        train_chars, val_chars, segments, digests = _encode_all(
            items, splits, vocab, dtype, bins.sinks[TRAIN_FILE], bins.sinks[VAL_FILE], chunk_chars, encoding)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "corpus_url": corpus_url,
            "vocab": {"chars": list(vocab.chars), "unknown": vocab.has_unknown},
            "dtype": dtype,
            "train_chars": train_chars,
            "val_chars": val_chars,
            "val_scored_chars": int(sum(s[2] for s in segments)),
            "val_context": VAL_CONTEXT,
            "val_segments": segments,
            "total_chars": total,
            **_provenance(items, splits, skipped, fingerprint(sources, options)),
            "options": {**options, "min_char_count_resolved": resolved},
            "unknown_chars": unknown,
            "sha256": digests,
            "seconds": round(time.monotonic() - started, 3),
            **({"vocab_parent": {"size": len(base_vocab), "added": added}} if base_vocab is not None else {}),
        }
        meta["checksum"] = meta_checksum(meta)
        if validate is not None:
            validate(meta)
        bins.publish(meta)
    log(summary(meta, output_url))
    return meta


def _writable_and_listed(corpus_url: str, output_url: str, exclude: Iterable[str],
                         log: Callable[[str], None]) -> list:
    """The corpus's files, once `output_url` is known to take files; what the listing left out, said in lines."""
    storage.check_writable(output_url)
    sources, notes = _listing(corpus_url, (output_url, *exclude))
    for note in notes:
        log(f"corpus {corpus_url}: {note}")
    return sources


def _listed_size(sources: list) -> int | None:
    """The corpus's bytes as listed, None where a size is unknown (a URL without Content-Length)."""
    sizes = [s.size for s in sources]
    return sum(sizes) if None not in sizes else None


def _with_separators(counts: np.ndarray, files: int) -> np.ndarray:
    """The cleaned files' character counts plus the blank line written between two files."""
    counts = _add_counts(counts, np.zeros(ord("\n") + 1, np.int64))  # (counts is at least this long)
    counts[ord("\n")] += files - 1
    return counts


def _choose_vocab(counts: np.ndarray, resolved: int, base_vocab: Vocab | None,
                  new_to_unknown: bool) -> tuple[Vocab, list[str], dict[str, Any]]:
    """The dataset's vocabulary from the character counts (or a fine-tuning parent's, extended), the characters it
    added to the parent's, and meta.json's summary of the characters that map to the unknown id."""
    added: list[str] = []
    if base_vocab is None:
        vocab = Vocab.from_counts(counts, resolved)
        rare = (counts > 0) & (counts < resolved)
    else:
        vocab, added = extended_vocab(base_vocab, counts, resolved, new_to_unknown)
        known = np.zeros(len(counts), bool)
        real = [ord(c) for c in vocab.chars[: len(vocab) - vocab.has_unknown] if ord(c) < len(counts)]
        known[real] = True
        rare = (counts > 0) & ~known
    if len(vocab) > MAX_IDS:
        raise UserError(f"corpus has {len(vocab)} distinct characters, more than {MAX_IDS} ids fit; "
                        "raise --min-char-count")
    unknown = {"distinct": int(rare.sum()), "occurrences": int(counts[rare].sum()),
               "examples": [chr(c) for c in np.flatnonzero(rare)[:20]]}
    return vocab, added, unknown


def _provenance(items: list[_Cleaned], splits: list[int], skipped: list, fingerprint_: str) -> dict[str, Any]:
    """What the dataset was made from: each file (name, size, version, sha256, its train / held-out chars), the
    files skipped, the checksum of the cleaned corpus and the listing's fingerprint."""
    return {
        "files": [{"name": i.source.name, "size": i.raw_size, "version": i.source.version,
                   "sha256": i.sha256, "cleaned_chars": i.chars, "train_chars": min(s, i.chars),
                   "val_chars": i.chars - min(s, i.chars)} for i, s in zip(items, splits, strict=True)],
        "skipped_files": skipped,
        "corpus_sha256": _corpus_sha256(items),
        "fingerprint": fingerprint_,
    }


def _check_held_out(items: list[_Cleaned], splits: list[int], total: int, val_fraction: float) -> None:
    """Every file must leave training text before its held-out tail, and the tails must hold something."""
    if all(s >= i.chars for s, i in zip(splits, items, strict=True)) or min(splits) < 1:
        if len(items) == 1:
            raise UserError(f"corpus too short: {total} chars leave no held-out part; use a longer corpus")
        raise UserError(
            f"corpus too short for a held-out part: each of its {len(items)} files needs more "
            f"than {VAL_CONTEXT + 2} training chars before its last {val_fraction:.0%}, and the longest has "
            f"{max(i.chars for i in items)} chars after cleaning; join short files into longer ones (e.g. cat "
            "*.txt > all.txt) or add longer files")


def summary(meta: dict, output_url: str) -> str:
    """One log line describing a dataset."""
    skipped = meta["skipped_files"]
    skip_note = f", skipped {len(skipped)} bad file(s): {', '.join(s['name'] for s in skipped[:5])}" if skipped else ""
    unknown = meta["unknown_chars"]
    parent = meta.get("vocab_parent")
    which = "char(s) the parent model lacks" if parent else \
        f"rare char(s) (< {meta['options']['min_char_count_resolved']})"
    unknown_note = (f", {unknown['distinct']} {which} mapped to the unknown id: {unknown['occurrences']} "
                    "occurrence(s)") if unknown["distinct"] else ""
    parent_note = (f": the parent model's {parent['size']} + {len(parent['added'])} new "
                   f"({''.join(parent['added'][:20])!r})") if parent else ""
    return (f"dataset {output_url}: {len(meta['files'])} file(s), {meta['train_chars']} training chars, "
            f"{meta['val_scored_chars']} held-out chars in {len(meta['val_segments'])} segment(s), "
            f"vocabulary {len(meta['vocab']['chars'])}{parent_note} ({meta['dtype']}){unknown_note}{skip_note}, "
            f"{meta['seconds']:.1f} s")


# ---------------------------------------------------------------------------------- reuse and read


def read_meta(dataset_url: str) -> dict | None:
    """meta.json of the dataset at `dataset_url`, or None where there is none. A meta.json that is unreadable, of
    another format or edited since it was prepared is refused in one line (DamagedDataset)."""
    url = storage.join(dataset_url, META_FILE)
    found = storage.read_versioned(url)
    if found is None:
        return None
    try:
        meta = json.loads(found[0])
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DamagedDataset(f"{url} is not a charlstm dataset's meta.json (unreadable or another format)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DamagedDataset(f"{url} is a dataset of format version {meta.get('format_version')}, this charlstm reads "
                             f"{FORMAT_VERSION}")
    if "checksum" in meta and meta["checksum"] != meta_checksum(meta):
        raise DamagedDataset(f"{url} was edited after the dataset was prepared (its checksum does not match)")
    return meta


class DamagedDataset(UserError):
    def __init__(self, what: str):
        super().__init__(f"{what}; prepare it again (python -m job.prepare --corpus C --output D --force) or "
                         "use another location")


def _meta_or_none(dataset_url: str) -> dict | None:
    """read_meta, with a damaged dataset counting as none (for callers about to replace it)."""
    try:
        return read_meta(dataset_url)
    except DamagedDataset:
        return None


def find_cached(output_url: str, corpus_url: str, options: dict, exclude: Iterable[str] = ()) -> dict | None:
    """The meta of a dataset at `output_url` prepared from the corpus as it is now with these options (see
    make_options), else None. Reads meta.json, the corpus listing and the .bin sizes, never a corpus file."""
    meta = read_meta(output_url)
    if meta is None or meta.get("fingerprint") != fingerprint(list_sources(corpus_url, (output_url, *exclude)),
                                                              options):
        return None
    return meta if _sizes_match(output_url, meta) else None


def _sizes_match(output_url: str, meta: dict) -> bool:
    itemsize = np.dtype(meta["dtype"]).itemsize
    for name, chars in ((TRAIN_FILE, meta["train_chars"]), (VAL_FILE, meta["val_chars"])):
        try:
            size = storage.info(storage.join(output_url, name))["size"]
        except UserError:
            return False
        if size != chars * itemsize:
            return False
    return True


def mismatch(meta: dict, corpus_url: str, options: dict, exclude: Iterable[str] = ()) -> str:
    """What differs between the dataset `meta` describes and this corpus and options ("" when nothing does)."""
    if _norm(str(meta.get("corpus_url"))) != _norm(corpus_url):
        return f"it was prepared from corpus {meta.get('corpus_url')}, not {corpus_url}"
    saved = {k: v for k, v in meta.get("options", {}).items() if k in options}
    changed = [f"{k} {saved[k]!r} -> {options[k]!r}" for k in options if k in saved and saved[k] != options[k]]
    if changed:
        return f"it was prepared with other options ({', '.join(changed)})"
    then = {f["name"]: (f["size"], f["version"]) for f in meta.get("files", [])}
    then.update({f["name"]: None for f in meta.get("skipped_files", [])})
    now = {s.name: (s.size, s.version) for s in list_sources(corpus_url, exclude)}
    added, gone = sorted(set(now) - set(then)), sorted(set(then) - set(now))
    edited = sorted(n for n in set(now) & set(then) if then[n] is not None and tuple(then[n]) != now[n])
    parts = [f"{label} {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
             for label, names in (("added", added), ("removed", gone), ("changed", edited)) if names]
    return f"the corpus files changed since ({'; '.join(parts) or 'listing differs'})"


def remove_abandoned(output_url: str, log: Callable[[str], None]) -> None:
    """Delete the work folders that killed preparations left: every `.prepare-*` in a local dataset folder (the
    caller holds its lease, so none is in use) and this host's `charlstm-prepare-<pid>-*` whose process is gone."""
    gone = []
    if storage.is_local(output_url) and os.path.isdir(storage.local_path(output_url)):
        folder = storage.local_path(output_url)
        gone += [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(LOCAL_TEMP_PREFIX)]
    system = tempfile.gettempdir()
    for name in os.listdir(system):
        pid = name[len(SYSTEM_TEMP_PREFIX):].split("-", 1)[0]
        if name.startswith(SYSTEM_TEMP_PREFIX) and pid.isdigit() and not psutil.pid_exists(int(pid)):
            gone.append(os.path.join(system, name))
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    if gone:
        log(f"removed {len(gone)} work folder(s) left by an interrupted preparation: {', '.join(gone[:3])}")


def verify(dataset_url: str, meta: dict, folder: str | None = None) -> None:
    """The .bin files (local, in `folder` or the dataset's own) hash to meta.json's sha256; else DamagedDataset."""
    folder = folder or storage.local_path(dataset_url)
    for name, digest in meta.get("sha256", {}).items():
        if file_sha256(os.path.join(folder, name)) != digest:
            raise DamagedDataset(f"{storage.join(dataset_url, name)} does not match the sha256 in its meta.json "
                                 "(damaged or changed after preparation)")


def ensure(corpus_url: str, output_url: str, *, lowercase: bool = True, val_fraction: float = 0.1,
           min_char_count: int | str | None = None, skip_bad_files: bool = False, force: bool = False,
           log: Callable[[str], None] = print, validate: Callable[[dict], None] | None = None,
           exclude: Iterable[str] = (), owner: str = "job.prepare", base_vocab: Vocab | None = None,
           new_to_unknown: bool = False, **kwargs) -> dict:
    """A current dataset at `output_url`: the one already there if its fingerprint matches (its checksums
    verified), else prepared now. A dataset of another corpus or other options is never prepared over unless
    `force`: it is refused in one line naming the difference. Either way `validate(meta)` (see prepare) accepts
    it first. Holds the dataset's lease throughout (waiting for another preparer of the same location)."""
    options = make_options(lowercase, val_fraction, min_char_count, skip_bad_files, base_vocab, new_to_unknown)
    storage.check_writable(output_url)
    guard.require_kind(output_url, "dataset", "--dataset/--output")
    with guard.Lease(output_url, owner, wait=True, log=log):
        remove_abandoned(output_url, log)
        meta = None if force else read_meta(output_url)
        if meta is not None:
            everything = (output_url, *exclude)
            if meta.get("fingerprint") != fingerprint(list_sources(corpus_url, everything), options):
                raise UserError(f"{output_url} already holds another dataset: "
                                f"{mismatch(meta, corpus_url, options, everything)}; use another --dataset/--output, "
                                "or replace it with python -m job.prepare --force")
            if _sizes_match(output_url, meta):
                if validate is not None:
                    validate(meta)
                if storage.is_local(output_url):
                    verify(output_url, meta)
                log(f"dataset {output_url} is current for {corpus_url} (fingerprint {meta['fingerprint'][:12]}); "
                    "reusing it")
                return meta
            log(f"dataset {output_url} is incomplete (its .bin files do not have meta.json's sizes)")
        log(f"preparing dataset {output_url} from {corpus_url}")
        return prepare(corpus_url, output_url, lowercase=lowercase, val_fraction=val_fraction,
                       min_char_count=min_char_count, skip_bad_files=skip_bad_files, log=log, validate=validate,
                       exclude=exclude, base_vocab=base_vocab, new_to_unknown=new_to_unknown, **kwargs)


@dataclass(frozen=True)
class LocalDataset:
    train: np.ndarray  # read-only np.memmap of ids
    val: np.ndarray
    vocab: Vocab
    val_segments: np.ndarray  # (segments, 3) int64: offset in val, context chars, scored chars
    meta: dict
    folder: str  # the local folder holding train.bin and val.bin


def cache_folder(meta: dict, cache_dir: str | None = None) -> str:
    """<cache_dir or $CHARLSTM_CACHE_DIR or ~/.cache/charlstm/datasets>/<fingerprint>"""
    root = cache_dir or os.environ.get("CHARLSTM_CACHE_DIR") or os.path.join("~", ".cache", "charlstm", "datasets")
    return os.path.join(os.path.expanduser(root), meta["fingerprint"])


def _memmap(path: str, dtype: str, n: int) -> np.ndarray:
    if n == 0:  # mmap cannot map an empty file
        empty = np.zeros(0, dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def open_local(dataset_url: str, meta: dict | None = None, cache_dir: str | None = None,
               verify_local: bool = False) -> LocalDataset:
    """train.bin and val.bin as read-only memory maps. A local dataset is mapped where it is (its checksums
    verified with `verify_local`: the training driver verifies before the workers start); a remote one is
    downloaded once per node into cache_folder and verified (several workers wait on one file lock; files appear
    by atomic rename; a file of the expected size is reused)."""
    meta = meta or read_meta(dataset_url)
    if meta is None:
        raise UserError(f"no prepared dataset at {dataset_url} (no meta.json); run python -m job.prepare first")
    dtype = meta["dtype"]
    wanted = {TRAIN_FILE: meta["train_chars"], VAL_FILE: meta["val_chars"]}
    itemsize = np.dtype(dtype).itemsize
    if storage.is_local(dataset_url):
        folder = storage.local_path(dataset_url)
    else:
        folder = cache_folder(meta, cache_dir)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            for name, chars in wanted.items():
                path = os.path.join(folder, name)
                if not (os.path.isfile(path) and os.path.getsize(path) == chars * itemsize):
                    storage.download_file(storage.join(dataset_url, name), path)
                    digest = meta.get("sha256", {}).get(name)
                    if digest and file_sha256(path) != digest:
                        os.remove(path)
                        raise DamagedDataset(f"{storage.join(dataset_url, name)} does not match the sha256 in "
                                             "its meta.json (damaged or changed after preparation)")
    for name, chars in wanted.items():
        path = os.path.join(folder, name)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != chars * itemsize:
            raise UserError(f"{storage.join(dataset_url, name)} has {size} bytes, meta.json expects "
                            f"{chars * itemsize}; the dataset is incomplete or being rewritten: prepare it again")
    if verify_local and storage.is_local(dataset_url):
        verify(dataset_url, meta)
    vocab = Vocab(tuple(meta["vocab"]["chars"]), has_unknown=bool(meta["vocab"]["unknown"]))
    return LocalDataset(
        train=_memmap(os.path.join(folder, TRAIN_FILE), dtype, meta["train_chars"]),
        val=_memmap(os.path.join(folder, VAL_FILE), dtype, meta["val_chars"]),
        vocab=vocab,
        val_segments=np.asarray(meta["val_segments"], np.int64).reshape(-1, 3),
        meta=meta,
        folder=folder,
    )


# -------------------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m job.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="A file, a folder/prefix (trailing /) or a glob; path, s3:// "
                                                   "or https:// (one file).")
    p.add_argument("--output", required=True, help="Folder or s3:// prefix for train.bin, val.bin, meta.json.")
    p.add_argument("--keep-case", action="store_true", help="Keep upper case (default: lowercase).")
    p.add_argument("--val-fraction", type=float, default=0.1, help="Held-out tail of each file (default 0.1).")
    p.add_argument("--min-char-count", default="auto",
                   help="Characters seen fewer times map to one unknown id (default auto: 1 per 10M chars).")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="Leave out empty, binary or non-UTF-8 files instead of stopping (they are listed).")
    p.add_argument("--force", action="store_true", help="Prepare again even if the output is current, replacing "
                   "whatever dataset is there (another corpus's included).")
    p.add_argument("--workers", type=_workers, default=None,
                   help="Processes cleaning files side by side (default: one per usable core for a corpus of "
                        "several files and 64 MB or more; 1: none). The dataset is the same whatever the number.")
    p.add_argument("--log-every-seconds", type=float, default=30.0,
                   help="A progress line (read, rate, eta) at most every N seconds (default 30; 0: none).")
    return p


def _workers(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.log_every_seconds >= 0:
        raise UserError(f"--log-every-seconds must be >= 0 (got {args.log_every_seconds})")
    ensure(args.corpus, args.output, lowercase=not args.keep_case, val_fraction=args.val_fraction,
           min_char_count=args.min_char_count, skip_bad_files=args.skip_bad_files, force=args.force,
           log=lambda line: print(line, flush=True), workers=args.workers, log_every=args.log_every_seconds)
    return 0


if __name__ == "__main__":
    from job.data import prepare  # by its name: child processes find what it defines (e.g. _clean_in_child) there

    sys.exit(run_cli(prepare.main))
