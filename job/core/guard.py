"""One writer and one identity per output location (a training --output, a generation --output, a dataset).

Lease: `<location>/.lease.json` names the process that writes there (owner id, host, pid, command, heartbeat
time). It is created only if absent and renewed or taken over only if unchanged since it was read
(storage.write_if: conditional PUTs on S3, a folder flock locally), so of two commands started together exactly
one gets it. The holder renews it every quarter of LEASE_SECONDS from a background thread and deletes it when
done. A holder that stops renewing (a crash, a lost node) is stale once its heartbeat is LEASE_SECONDS old, or at
once when it ran on this host and its process is gone; the next command then takes over, saying so in one line.
Under Ray the driver holds the lease, so worker restarts, elastic resizes and Ray's retries stay one writer.

Identity: `<location>/output.json` records what made a training or generation output (the run name and the
settings that shape its model and data; the model's sha256 and the sampling settings). A later command whose
identity differs is refused in one line naming the difference. A dataset's identity is its meta.json
(fingerprint of the corpus listing and the options; job.prepare).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil

from job.core import storage
from job.core.errors import UserError

LEASE_FILE = ".lease.json"
IDENTITY_FILE = "output.json"
IDENTITY_FORMAT = "charlstm-output"
DEFAULT_LEASE_SECONDS = 60.0
KINDS = {"training": "a training output", "generation": "a generation output", "dataset": "a prepared dataset"}


def lease_seconds() -> float:
    """How long a lease lives without a heartbeat (CHARLSTM_LEASE_SECONDS, default 60): long enough that a slow
    renewal (an S3 hiccup within the storage retries' bounds) never loses it, short enough that a crashed run
    blocks its output for about a minute."""
    raw = os.environ.get("CHARLSTM_LEASE_SECONDS")
    try:
        value = float(raw) if raw else DEFAULT_LEASE_SECONDS
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"CHARLSTM_LEASE_SECONDS={raw!r} is not a positive number of seconds; fix or unset it")
    return value


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def describe_holder(holder: dict[str, Any], now: float) -> str:
    age = now - float(holder.get("heartbeat", 0))
    return (f"{holder.get('command', 'another command')} on host {holder.get('host', '?')} "
            f"pid {holder.get('pid', '?')} (last heartbeat {age:.0f} s ago)")


def stale_reason(holder: dict[str, Any] | None, now: float, ttl: float) -> str | None:
    """Why a lease no longer protects anything ("" when it does): damaged, expired, or its process gone."""
    if holder is None:
        return "it was unreadable"
    age = now - float(holder.get("heartbeat", 0))
    if age > float(holder.get("ttl", ttl)):
        return f"its last heartbeat was {age:.0f} s ago"
    if holder.get("host") == socket.gethostname():
        started = _process_started(int(holder.get("pid", -1)))
        if started is None or abs(started - float(holder.get("process_started", started))) > 1.0:
            return "its process is gone"
    return ""


def _parse(blob: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(blob)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) and "owner" in holder else None


class Lease:
    """`with Lease(url, "train"):` — this process is the only writer of `url` inside the block.

    `wait=True` waits (printing one line) while a live holder works, instead of refusing: two trainings that share
    a --dataset take turns to prepare it. `on_lost` runs if another process takes the lease over (this one could
    not renew it for LEASE_SECONDS); by default it prints one line and stops this process as SIGTERM does."""

    def __init__(self, url: str, command: str, *, wait: bool = False, log: Callable[[str], None] = print,
                 on_lost: Callable[[str], None] | None = None, flag: str = "--output"):
        self.url, self.command, self.wait, self.log, self.flag = url, command, wait, log, flag
        self.lease_url = storage.join(url, LEASE_FILE)
        self.ttl = lease_seconds()
        self.on_lost = on_lost or _stop_this_process
        self.owner = uuid.uuid4().hex
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created: list[str] = []  # local folders this lease made (removed on release if left empty)

    def _body(self) -> bytes:
        me = psutil.Process()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "process_started": me.create_time(), "command": self.command, "heartbeat": time.time(),
                           "ttl": self.ttl, "argv": " ".join(sys.argv)[:500]}).encode()

    # ------------------------------------------------------------------------------------------ acquire
    def acquire(self) -> Lease:
        self._note_created_folders()
        waited = False
        while True:
            current = storage.read_versioned(self.lease_url)
            if current is None:
                self.token = storage.write_if(self.lease_url, self._body(), None)
                if self.token:
                    break
                continue  # another command created it between our read and our write: look again
            blob, token = current
            holder = _parse(blob)
            now = time.time()
            reason = stale_reason(holder, now, self.ttl)
            if reason:
                self.token = storage.write_if(self.lease_url, self._body(), token)
                if self.token:
                    who = describe_holder(holder, now) if holder else "a damaged lease"
                    self.log(f"took over {self.url} from {who}: {reason}")
                    break
                continue
            if not self.wait:
                self.release()
                raise UserError(
                    f"{self.url} is in use by {describe_holder(holder, now)}; wait for it to finish or use another "
                    f"{self.flag} (a writer that died releases it {self.ttl:.0f} s after its last heartbeat)")
            if not waited:
                self.log(f"waiting for {describe_holder(holder, now)}, which is writing {self.url}")
                waited = True
            time.sleep(min(2.0, self.ttl / 4))
        self._thread = threading.Thread(target=self._heartbeat, name="charlstm-lease", daemon=True)
        self._thread.start()
        return self

    def _note_created_folders(self) -> None:
        if not storage.is_local(self.url):
            return
        folder = os.path.abspath(storage.local_path(self.url))
        while not os.path.exists(folder):
            self._created.append(folder)  # deepest first
            folder = os.path.dirname(folder)

    # ---------------------------------------------------------------------------------------- heartbeat
    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                token = storage.write_if(self.lease_url, self._body(), self.token)
            except Exception:  # noqa: BLE001 - storage unreachable for now: try again at the next beat
                continue
            if token:
                self.token = token
                continue
            current = storage.read_versioned(self.lease_url)
            holder = _parse(current[0]) if current else None
            if holder and holder.get("owner") == self.owner:  # our own write landed but its answer was lost
                self.token = current[1]
                continue
            who = describe_holder(holder, time.time()) if holder else "nobody (the lease was removed)"
            self.token = None
            self.on_lost(f"lost the lease on {self.url} to {who}: this run could not renew it for "
                         f"{self.ttl:.0f} s; stopping so that two writers never mix")
            return

    # ------------------------------------------------------------------------------------------ release
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self.token:
            try:
                storage.delete_if(self.lease_url, self.token)
            except UserError:
                pass  # unreachable storage: the lease expires on its own
            self.token = None
        for folder in self._created:  # a refused or failed command leaves no empty folders behind
            try:
                os.rmdir(folder)
            except OSError:
                break

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _stop_this_process(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the clean path of `ray job stop` / Ctrl-C (job.core.errors)


# ---------------------------------------------------------------------------------------------- identity


def read_identity(url: str) -> dict[str, Any] | None:
    """output.json at `url`, or None. A damaged one is refused: the location's owner can no longer be told."""
    target = storage.join(url, IDENTITY_FILE)
    if not storage.exists(target):
        return None
    try:
        found = json.loads(storage.read_text(target))
    except (ValueError, UnicodeDecodeError):
        found = None
    if not isinstance(found, dict) or found.get("format") != IDENTITY_FORMAT or found.get("kind") not in KINDS:
        raise UserError(f"{target} is not a charlstm output record (damaged or someone else's file); "
                        "use another location, or remove it if the location is yours")
    return found


def is_identity_file(url: str) -> bool:
    """True if `url` is an output record of ours (a corpus may hold a user's own output.json)."""
    try:
        found = json.loads(storage.read_text(url))
    except (UserError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(found, dict) and found.get("format") == IDENTITY_FORMAT


def write_identity(url: str, kind: str, identity: dict[str, Any]) -> None:
    record = {"format": IDENTITY_FORMAT, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **identity}
    storage.write_text(storage.join(url, IDENTITY_FILE), json.dumps(record, indent=1, sort_keys=True) + "\n")


def require_kind(url: str, kind: str, flag: str) -> dict[str, Any] | None:
    """Refuse a location that holds another kind of output (its output.json's kind, or a dataset's meta.json beside
    train.bin at its top); returns its identity record (None if it has none)."""
    record = read_identity(url)
    found = record["kind"] if record else None
    if found is None and storage.exists(storage.join(url, "meta.json")) and \
            storage.exists(storage.join(url, "train.bin")):
        found = "dataset"
    if found not in (None, kind):
        raise UserError(f"{url} is {KINDS[found]}; give this {KINDS[kind].split(' ', 1)[1]} its own {flag}")
    return record


def differences(saved: dict[str, Any], now: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """`key saved -> now` for every key whose value differs (a key the record lacks is not compared)."""
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if k in saved and saved.get(k) != now.get(k)]
