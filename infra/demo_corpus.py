"""The demo's corpus: Alice from Project Gutenberg, or, offline, invented prose the project writes itself.

    python -m infra.demo_corpus TARGET [URL]

Prints the path of the corpus to use (TARGET, or TARGET.generated offline) on stdout; offline it says so in one
line on stderr. No traceback: `make demo` must run to the end on a machine without internet.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

GENERATED_CHARS = 160_000
DOWNLOAD_TIMEOUT = 20


def fetch_or_generate(target: str, url: str) -> str:
    """Download `url` to `target` (atomically); if that fails, write invented prose to `target`.generated."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
            data = response.read()
        with open(target + ".part", "wb") as fh:
            fh.write(data)
        os.replace(target + ".part", target)
        return target
    except Exception as exc:  # noqa: BLE001 - any failure to download means "offline": fall back, say why
        reason = str(getattr(exc, "reason", exc)).splitlines()[0] or type(exc).__name__
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/textgen.py: invented prose
    import textgen

    generated = target + ".generated"
    with open(generated, "w", encoding="utf-8") as fh:
        fh.write(textgen.book(GENERATED_CHARS, seed=11))
    print(f"== cannot download the corpus ({reason}); using {GENERATED_CHARS:,} characters of invented prose "
          "instead (make demo CORPUS=/path/to/text for your own)", file=sys.stderr, flush=True)
    return generated


def main(argv: list[str]) -> int:
    from job.core.config import DEFAULT_CORPUS_URL

    target = argv[0]
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    print(fetch_or_generate(target, argv[1] if len(argv) > 1 else DEFAULT_CORPUS_URL), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
