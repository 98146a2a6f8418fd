"""Corpus cleaning and the character vocabulary. Plain data, no TensorFlow."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from job.core import storage
from job.core.errors import UserError

# Both the current and the older Project Gutenberg markers. The start line is dropped with
# everything above it; the first end marker after it is dropped with everything below it.
_START = re.compile(r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.M | re.I)
_END = re.compile(
    r"^\s*(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*"
    r"|End of (?:the )?Project Gutenberg(?:'s|’s)? .*"
    r"|End of (?:the )?Project Gutenberg E-?Book.*)$",
    re.M | re.I,
)


def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header and footer if present (text without them is unchanged)."""
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text


def normalise(text: str) -> str:
    """Drop a byte-order mark and turn CRLF / lone CR line ends into LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode(data: bytes, source: str) -> str:
    """Strict UTF-8 decoding with a message a user can act on (job.prepare's streaming decoder says the same)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"corpus {source} is UTF-16 text (it starts with a UTF-16 byte-order mark); convert it, "
                        "e.g. iconv -f utf-16 -t utf-8")
    if b"\x00" in data[:65536]:
        raise UserError(f"corpus {source} looks binary (NUL bytes; or UTF-16/32 text without a byte-order mark); "
                        "give a plain UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"corpus {source} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if "\x00" in text:  # past the probe: damaged text, not a character to learn
        at = data.index(b"\x00")
        raise UserError(f"corpus {source} has a NUL byte at offset {at}; give plain UTF-8 text")
    return text


def clean(text: str, lowercase: bool = True) -> str:
    """The full cleaning pipeline: normalise, strip boilerplate, trim, optionally lowercase."""
    text = strip_gutenberg(normalise(text)).strip("\n ") + "\n"
    return text.lower() if lowercase else text


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


UNKNOWN_CHAR = "\ufffd"  # what the unknown id decodes to (Unicode's replacement character)
_NO_ID = -1


@functools.lru_cache(maxsize=8)
def _lookup_table(chars: tuple[str, ...], unknown: bool) -> np.ndarray:
    """Code point -> id (int32, 0x110000 entries, 4.4 MB). Cached per vocabulary, outside the dataclass so a
    Vocab stays small when pickled to Ray workers. Read-only so no caller can corrupt the shared copy."""
    table = np.full(0x110000, len(chars) - 1 if unknown else _NO_ID, np.int32)
    table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)
    table.flags.writeable = False
    return table


def code_points(text: str) -> np.ndarray:
    """The code points of `text` as uint32, without a Python loop ("surrogatepass" keeps lone surrogates, which
    strict UTF-8 input never has, from raising: they are simply characters no vocabulary holds)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


@dataclass(frozen=True)
class Vocab:
    """Sorted distinct characters; id = position in `chars`.

    With `has_unknown=True` the last id is the unknown id: `chars[-1]` is U+FFFD (what it decodes to) and every
    character outside the vocabulary encodes to it. A kept U+FFFD is moved there from its sorted place, so the
    unknown id is always the last one and doubles as the id of a real U+FFFD."""

    chars: tuple[str, ...]
    has_unknown: bool = False  # (not `unknown`: that name is the method listing characters outside `chars`)

    def __post_init__(self) -> None:
        if self.has_unknown and (not self.chars or self.chars[-1] != UNKNOWN_CHAR):
            raise ValueError("a vocabulary with an unknown id must end with U+FFFD")

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(sorted(set(text))))

    @classmethod
    def from_counts(cls, counts: np.ndarray, min_count: int = 1) -> Vocab:
        """Characters (indexed by code point in `counts`) seen at least `min_count` times, sorted; if some seen
        character falls below the threshold, an unknown id is added for all of them."""
        counts = np.asarray(counts)
        kept = [chr(c) for c in np.flatnonzero(counts >= max(1, min_count))]
        rare = bool(np.any((counts > 0) & (counts < min_count)))
        if not rare:
            return cls(tuple(kept))
        return cls(tuple(c for c in kept if c != UNKNOWN_CHAR) + (UNKNOWN_CHAR,), has_unknown=True)

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def unknown_id(self) -> int | None:
        return len(self.chars) - 1 if self.has_unknown else None

    @property
    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    @property
    def lookup_table(self) -> np.ndarray:
        """Read-only int32 array: code point -> id (-1 for characters outside a vocabulary without unknown id)."""
        return _lookup_table(self.chars, self.has_unknown)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` outside `chars`, sorted."""
        known = set(self.chars)
        return sorted({c for c in text if c not in known})

    def encode_code_points(self, cps: np.ndarray) -> np.ndarray:
        """Ids (int32) for an array of code points; -1 where a character is outside the vocabulary (only
        possible without an unknown id)."""
        return self.lookup_table[cps]

    def encode(self, text: str, skip_unknown: bool = False) -> np.ndarray:
        ids = self.encode_code_points(code_points(text))
        if self.has_unknown or not len(ids):
            return ids
        missing = ids < 0
        if not missing.any():
            return ids
        if not skip_unknown:
            chars = self.unknown(text)
            shown = ", ".join(repr(c) for c in chars[:10])
            raise UserError(
                f"text has {len(chars)} character(s) outside the model's vocabulary: {shown}; "
                "remove them (or use --unknown-chars skip where offered)"
            )
        return ids[~missing]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def decode_rows(self, ids: np.ndarray) -> list[str]:
        """decode() of every row of a 2-D id array at numpy speed (a million seeds in about a second, not 90)."""
        ids = np.asarray(ids)
        if ids.shape[1] == 0:
            return [""] * len(ids)
        rows = np.asarray(self.chars, dtype="<U1")[ids]
        texts = np.ascontiguousarray(rows).view(f"<U{ids.shape[1]}").ravel().tolist()
        # numpy drops trailing NULs from fixed-width strings: decode such rows one by one
        return [t if len(t) == ids.shape[1] else self.decode(row) for t, row in zip(texts, ids, strict=True)]

    def to_json(self) -> str:
        return json.dumps({"chars": list(self.chars), "unknown": self.has_unknown}, ensure_ascii=False, indent=0)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        try:
            data = json.loads(text)
            chars = data["chars"]
            has_unknown = data.get("unknown", False)  # absent in files written before the unknown id existed
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError("vocab.json is malformed; it must hold {\"chars\": [...]}") from None
        if not chars or len(set(chars)) != len(chars) or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise UserError("vocab.json must list distinct single characters")
        if not isinstance(has_unknown, bool) or (has_unknown and chars[-1] != UNKNOWN_CHAR):
            raise UserError("vocab.json: \"unknown\" must be true or false, and when true the last char must be "
                            "U+FFFD")
        return cls(tuple(chars), has_unknown=has_unknown)


def extended_vocab(base: Vocab, counts: np.ndarray, min_count: int, new_to_unknown: bool) -> tuple[Vocab, list[str]]:
    """The fine-tuning vocabulary: `base` first, ids unchanged, then the characters of `counts` (indexed by code
    point) seen at least `min_count` times that `base` lacks, sorted, appended; with `new_to_unknown` they are not
    added but share the unknown id. The unknown id, where there is one (the base's, or one that rare or unmapped
    characters need), is last. Returns (vocabulary, the characters added)."""
    known = [c for c in base.chars if c != UNKNOWN_CHAR or not base.has_unknown]
    have = set(known)
    seen = [chr(c) for c in np.flatnonzero(np.asarray(counts) > 0)]
    frequent = {chr(c) for c in np.flatnonzero(np.asarray(counts) >= max(1, min_count))}
    fresh = [c for c in seen if c not in have and c in frequent and c != UNKNOWN_CHAR] if not new_to_unknown else []
    unmapped = any(c not in have and c not in fresh for c in seen)
    chars = (*known, *fresh)
    if base.has_unknown or unmapped:
        return Vocab((*chars, UNKNOWN_CHAR), has_unknown=True), fresh
    return Vocab(chars), fresh


def split_point(n: int, val_fraction: float) -> int:
    """Index where the contiguous held-out tail begins."""
    return n - max(1, int(round(n * val_fraction)))


@dataclass(frozen=True)
class Corpus:
    url: str
    text: str
    sha256: str


def load(url: str, lowercase: bool = True) -> Corpus:
    """Read, decode and clean a corpus from any URL storage understands."""
    data = storage.read_bytes(url)
    if not data.strip():
        raise UserError(f"corpus {url} is empty; give a text file with some content")
    text = clean(decode(data, url), lowercase=lowercase)
    if not text.strip():
        raise UserError(f"corpus {url} has no text once Project Gutenberg boilerplate is removed")
    return Corpus(url=url, text=text, sha256=sha256(text))
