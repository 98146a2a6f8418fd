"""User-facing errors: one clear line, non-zero exit, no traceback."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class UserError(Exception):
    """A problem the user can fix (bad flag, missing corpus, wrong bucket...).

    The message must say what is wrong and how to fix it, on one line.
    """


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class _Terminated:
    flag = False


def _on_sigterm(signum, frame) -> None:
    """SIGTERM (`ray job stop`, Kubernetes deleting the pod, `kill`) takes the same clean path as Ctrl-C:
    whatever SIGINT handler is in force runs, so under Ray Train its handler aborts the run and stops every
    worker, and elsewhere KeyboardInterrupt unwinds through the same `finally` blocks."""
    _Terminated.flag = True
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    raise KeyboardInterrupt


def install_sigterm_handler():
    """Route SIGTERM through `_on_sigterm` (main thread only); returns the handler it replaced, or None.
    Called again after `ray.init`, which installs its own SIGTERM handler (a bare sys.exit that skips Ray
    Train's abort and reads as a crash)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


class _Deferred:
    active = False
    pending: int | None = None


def _record(signum, frame) -> None:
    _Deferred.pending = signum


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Inside: Ctrl-C and SIGTERM are only recorded, and `check_interrupt()` raises them at a safe point.

    Python runs a signal handler between bytecodes, which can be in the middle of TensorFlow's tracing code:
    a KeyboardInterrupt raised there once surfaced as `SystemError: ... bad argument to internal function`
    (exit 1, a traceback) instead of a clean stop. Used around an in-process training loop, which calls
    check_interrupt() after every compiled call; a no-op outside the main thread (Ray actors)."""
    if threading.current_thread() is not threading.main_thread() or _Deferred.active:
        yield
        return
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    _Deferred.active, _Deferred.pending = True, None
    signal.signal(signal.SIGINT, _record)
    signal.signal(signal.SIGTERM, _record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
        _Deferred.active = False
    check_interrupt()


def check_interrupt() -> None:
    """Raise a Ctrl-C / SIGTERM recorded by deferred_interrupts() (KeyboardInterrupt; run_cli reports it)."""
    signum, _Deferred.pending = _Deferred.pending, None
    if signum is not None:
        _Terminated.flag = signum == signal.SIGTERM
        raise KeyboardInterrupt


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a CLI entry point; turn UserError into one line on stderr and exit code 2, Ctrl-C into
    "interrupted" (130) and SIGTERM into "terminated" (143), never a traceback."""
    previous = install_sigterm_handler()
    _Terminated.flag = False
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if _Terminated.flag:
            print("terminated", file=sys.stderr, flush=True)
            return EXIT_TERMINATED
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
