"""Judge what a command printed. `run` a CLI; `assert_user_error`: a user error is exactly one error line, the
last word, exit code 2, no traceback. In logs, a traceback fails a test only when one of its frames is in a
file of this repository's job/ or infra/ package.

Logs that mix Ray's own output (driver stderr under Ray, `ray job submit` output, job logs) may hold Ray's
internal tracebacks, e.g. "Failed to stop PlacementGroupCleaner gracefully ... GetTimeoutError" from Ray
Train's controller; those say nothing about our code. Output of processes that never start Ray keeps the
strict `"Traceback" not in ...` check: there any traceback is ours.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Module names (file stems) of our packages and sub-packages (job/core/, job/data/, ...), keyed by the package's
# folder path, read from the repository so new modules count at once.
OUR_MODULES = {
    tuple(folder.relative_to(REPO).parts): frozenset(p.stem for p in folder.glob("*.py"))
    for top in ("job", "infra") for folder in (REPO / top, *(d.parent for d in (REPO / top).rglob("*/__init__.py")))
}

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray's per-process prefix on forwarded lines: "(RayTrainWorker pid=12)", "(pid=12, ip=10.0.0.1)", "(raylet)".
_RAY_PREFIX = re.compile(r"^\((?:[^()]*\bpid=\d+[^()]*|raylet|gcs_server|autoscaler[^()]*)\)\s?")
_FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line \d+')
_HEADER = re.compile(r"Traceback \(most recent call last\)|^ray::")


def is_our_file(path: str) -> bool:
    """True for <anything>/job/[<sub-package>/]<module>.py or <anything>/infra/<module>.py of this repository's
    modules, wherever the code runs from (the repo, site-packages/job/, or Ray's working-dir copy under
    /tmp/ray/...); never for Ray's own files such as .../site-packages/ray/dashboard/modules/job/job_manager.py."""
    p = path.replace("\\", "/")
    if any(ray_dir in p for ray_dir in ("/site-packages/ray/", "/dist-packages/ray/", "/python/ray/")):
        return False
    parts = p.split("/")
    if len(parts) < 2 or not parts[-1].endswith(".py"):
        return False
    module = parts[-1][:-3]
    for package, modules in OUR_MODULES.items():
        n = len(package)
        if tuple(parts[-1 - n:-1]) == package and module in modules:
            return not (len(parts) >= n + 2 and parts[-2 - n] == "modules")  # ray/dashboard/modules/job/*.py
    return False


def _plain_lines(text: str) -> list[str]:
    return [_RAY_PREFIX.sub("", _ANSI.sub("", line)) for line in text.splitlines()]


def _block(lines: list[str], i: int) -> tuple[int, int]:
    """[start, end) of the traceback block holding the frame line i: the header line above the indented
    frame lines, down to the first unindented line after them (the exception) inclusive."""
    start = i
    while start > 0 and lines[start - 1][:1].isspace():
        start -= 1
    if start > 0 and _HEADER.search(lines[start - 1]):
        start -= 1
    end = i + 1
    while end < len(lines) and (lines[end][:1].isspace() or not lines[end].strip()):
        end += 1
    return start, min(end + 1, len(lines))


def tracebacks_from_our_code(text: str) -> list[str]:
    """Every traceback block in `text` (Ray's line prefixes and colours removed) with a frame in our files."""
    lines = _plain_lines(text)
    blocks: dict[int, str] = {}
    for i, line in enumerate(lines):
        m = _FRAME.match(line)
        if m and is_our_file(m.group("path")):
            start, end = _block(lines, i)
            blocks.setdefault(start, "\n".join(lines[start:end]))
    return list(blocks.values())


def assert_no_traceback_from_our_code(text: str) -> None:
    """Fail, showing the block(s), if `text` holds a Python traceback that passes through our code."""
    found = tracebacks_from_our_code(text)
    assert not found, "traceback(s) through our code:\n\n" + "\n\n".join(found)


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m <args>` from the repository root, output captured; `env` adds to this environment."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def _is_error_line(line: str) -> bool:
    return line.startswith("error: ") or ": error: " in line  # ours, or argparse's "<prog>: error: ..."


def assert_one_line_error(text: str, fragment: str, ray_logs: bool = False) -> str:
    """Exactly one error line, holding `fragment`, and no traceback; returns that line.

    ray_logs: `text` holds a Ray job's logs, where Ray's own processes may log their internal tracebacks;
    only a traceback through our code fails then. Elsewhere (no Ray) any traceback is ours."""
    if ray_logs:
        assert_no_traceback_from_our_code(text)
    else:
        assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if _is_error_line(line)]
    assert len(errors) == 1, text[-3000:]
    assert fragment in errors[0], errors[0]
    return errors[0]


def assert_user_error(proc: subprocess.CompletedProcess, fragment: str) -> str:
    """Exit code 2 and one error line holding `fragment`, the last line printed."""
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stderr[-3000:]}"
    line = assert_one_line_error(proc.stderr, fragment)
    assert [x for x in proc.stderr.splitlines() if x.strip()][-1] == line  # the error is the last word
    return line
