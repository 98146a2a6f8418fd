"""Corpus cleaning and the character vocabulary. Plain data, no TensorFlow."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from job.errors import UserError

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
    """Strict UTF-8 decoding with a message a user can act on."""
    if b"\x00" in data[:65536]:
        raise UserError(f"corpus {source} looks binary (NUL bytes); give a plain UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"corpus {source} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def clean(text: str, lowercase: bool = True) -> str:
    """The full cleaning pipeline: normalise, strip boilerplate, trim, optionally lowercase."""
    text = strip_gutenberg(normalise(text)).strip("\n ") + "\n"
    return text.lower() if lowercase else text


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Vocab:
    """Sorted distinct characters; id = position in `chars`."""

    chars: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def unknown(self, text: str) -> list[str]:
        known = set(self.chars)
        return sorted({c for c in text if c not in known})

    def encode(self, text: str, skip_unknown: bool = False) -> np.ndarray:
        missing = self.unknown(text)
        if missing and not skip_unknown:
            shown = ", ".join(repr(c) for c in missing[:10])
            raise UserError(
                f"text has {len(missing)} character(s) outside the model's vocabulary: {shown}; "
                "remove them (or use --unknown-chars skip where offered)"
            )
        index = self.index
        return np.fromiter((index[c] for c in text if c in index), dtype=np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"chars": list(self.chars)}, ensure_ascii=False, indent=0)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        try:
            chars = json.loads(text)["chars"]
        except (ValueError, KeyError, TypeError):
            raise UserError("vocab.json is malformed; it must hold {\"chars\": [...]}") from None
        if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise UserError("vocab.json must list distinct single characters")
        return cls(tuple(chars))


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
    from job import storage

    data = storage.read_bytes(url)
    if not data.strip():
        raise UserError(f"corpus {url} is empty; give a text file with some content")
    text = clean(decode(data, url), lowercase=lowercase)
    if not text.strip():
        raise UserError(f"corpus {url} has no text once Project Gutenberg boilerplate is removed")
    return Corpus(url=url, text=text, sha256=sha256(text))
