"""A throw-away local stack: a moto S3 server and a Ray head, both on 127.0.0.1.

Used by `make demo` (through the CLI) and by the end-to-end tests (through the functions), so the demo and
the tests run the job exactly the same way: `ray job submit --working-dir .` against a real Ray head whose
jobs read and write a real S3 API over HTTP.

    python -m infra.localstack start  [--state-dir .stack] [--bucket NAME] [--upload FILE KEY] [--num-cpus N]
                                      [--worker-nodes N]   # head with no CPUs + N nodes of --num-cpus each
    eval "$(python -m infra.localstack env)"      # RAY_ADDRESS, RAY_AUTH_*, AWS_* for `ray job submit`
    python -m infra.localstack status
    python -m infra.localstack stop               # idempotent

Every process is started in its own session (`start_new_session=True`); `stop` signals exactly the process
groups recorded in `<state-dir>/state.json` (never `ray stop`, which would kill every Ray on the machine).

Ray token authentication (Ray >= 2.52): the head is started with `RAY_AUTH_MODE=token` and
`RAY_AUTH_TOKEN_PATH=<state-dir>/ray_auth_token` (a fresh token, mode 0600), and the client environment
carries the same two variables, so the `ray job` CLI sends the token and nothing depends on whether
`~/.ray/auth_token` exists (the path variable takes precedence over that default file).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = ".stack"
DEFAULT_BUCKET = "charlstm-local"
DEFAULT_NUM_CPUS = 4
REGION = "us-east-1"
# moto accepts any credentials unless IAM authentication is switched on; these are obviously fake.
FAKE_ACCESS_KEY = "testing"
FAKE_SECRET_KEY = "testing"
STATE_FILE = "state.json"
TOKEN_FILE = "ray_auth_token"

# Inherited variables that would point a process at some other S3 or Ray than ours.
_SCRUB_PREFIXES = ("AWS_",)
_SCRUB_EXACT = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class StackError(RuntimeError):
    """The local stack could not be started or reached."""


# --------------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A process we started in its own session; identified by pid + creation time (pid reuse safe)."""

    name: str
    pid: int
    start_time: float  # psutil's create_time()
    log: str
    argv: list[str] = field(default_factory=list)

    @property
    def pgid(self) -> int:
        return self.pid  # start_new_session=True: the process leads its own session and group

    def alive(self) -> bool:
        return running(self.pid, self.start_time)

    def members(self) -> dict[int, float]:
        """{pid: create time} of our live processes: the session/group of the leader (Ray's daemons and
        workers) plus all their descendants, including job drivers (Ray starts those in new sessions)."""
        if _create_time(self.pid) not in (None, self.start_time):
            # The pid was reused, so the kernel had freed it as a group/session id too: nothing of ours left.
            return {}
        ours: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            with contextlib.suppress(OSError):
                if os.getpgid(p.pid) == self.pgid or os.getsid(p.pid) == self.pid:
                    ours[p.pid] = p
        for p in list(ours.values()):
            with contextlib.suppress(psutil.Error):
                ours.update((c.pid, c) for c in p.children(recursive=True))
        return {pid: t for pid, p in ours.items() if (t := _create_time(pid)) is not None and running(pid, t)}

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the leader (it shuts its children down), then everything of ours, then SIGKILL. Idempotent.

        Processes seen once are remembered (by pid + creation time), so descendants that get orphaned while
        the leader shuts down are still found and signalled.
        """
        known: dict[int, float] = {}

        def live() -> dict[int, float]:
            known.update(self.members())
            return {pid: t for pid, t in known.items() if running(pid, t)}

        stages = ((signal.SIGTERM, False, timeout), (signal.SIGTERM, True, 3.0), (signal.SIGKILL, True, 5.0))
        for sig, everything, wait in stages:
            pids = live()
            if not pids:
                break
            if everything:
                if _create_time(self.pid) in (None, self.start_time):  # else the group id was reused
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.pgid, sig)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            elif self.alive():
                os.kill(self.pid, sig)
            else:
                continue  # no leader to shut the rest down gracefully
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and live():
                _reap(self.pid)
                time.sleep(0.1)
        _reap(self.pid)
        _OWNED.pop(self.pid, None)


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def running(pid: int, create_time: float) -> bool:
    """Process `pid` is still the one created at `create_time` and has not exited (zombies have)."""
    try:
        p = psutil.Process(pid)
        return p.create_time() == create_time and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_CHILDREN: dict[int, subprocess.Popen] = {}  # Popen objects of this process, so stopped children get reaped
# Started by this Python process and stopped when it exits (a safety net for crashed tests), unless detached.
_OWNED: dict[int, Proc] = {}


def detach() -> None:
    """Let every process started so far outlive this Python process (the CLI's `start` does this)."""
    _OWNED.clear()


@atexit.register
def _stop_owned() -> None:
    for proc in list(_OWNED.values()):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5.0)


def _reap(pid: int) -> None:
    popen = _CHILDREN.get(pid)
    if popen is not None and popen.poll() is not None:
        _CHILDREN.pop(pid, None)


def spawn(name: str, argv: list[str], env: dict[str, str], log_path: Path) -> Proc:
    """Start `argv` in a new session with stdout+stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, cwd=str(REPO_ROOT),
        )
    _CHILDREN[popen.pid] = popen
    start_time = _create_time(popen.pid) or -1.0
    proc = Proc(name=name, pid=popen.pid, start_time=start_time, log=str(log_path), argv=list(argv))
    _OWNED[proc.pid] = proc
    return proc


def _exited(proc: Proc) -> int | None:
    """Exit code if `proc` is one of our children and has exited, else None."""
    popen = _CHILDREN.get(proc.pid)
    if popen is not None:
        return popen.poll()
    return None if proc.alive() else -1


def log_tail(path: str | Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------- ports

_HANDED_OUT: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))  # all interfaces: stricter than 127.0.0.1 alone
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that is free now (and that this process has not handed out before)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise StackError("could not find a free TCP port")


def free_port_range(size: int = 200, low: int = 20000, high: int = 30000) -> tuple[int, int]:
    """A block of `size` consecutive free ports below the kernel's ephemeral range, for Ray's workers."""
    for _ in range(50):
        base = random.randrange(low, high - size)
        block = range(base, base + size)
        if not _HANDED_OUT.intersection(block) and all(_bindable(p) for p in block):
            _HANDED_OUT.update(block)
            return base, base + size - 1
    raise StackError(f"could not find {size} consecutive free ports in {low}-{high}")


def _http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# -------------------------------------------------------------------------------------------------- env


def venv_bin() -> Path:
    """The directory of this interpreter (the venv's bin/), which also holds `ray` and `moto_server`."""
    return Path(sys.executable).parent


def ray_executable() -> str:
    path = venv_bin() / "ray"
    return str(path) if path.exists() else (shutil.which("ray") or "ray")


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point boto3/s3fs/our storage module at a local S3 endpoint."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        # No instance-metadata probing (each probe can take a second when there is no EC2).
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def scrubbed_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) without variables that would point at another S3 or Ray."""
    env = dict(os.environ if base is None else base)
    for key in list(env):
        if key.startswith(_SCRUB_PREFIXES) or key in _SCRUB_EXACT:
            del env[key]
    return env


def ray_auth_env(token_path: str | Path) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


# ------------------------------------------------------------------------------------------------ S3


@dataclass
class S3Info:
    endpoint: str
    port: int
    bucket: str | None
    proc: Proc

    @property
    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)


def boto3_client(endpoint: str, **overrides: str):
    import boto3  # local import: the CLI's `stop`/`env` stay fast

    kwargs = dict(
        endpoint_url=endpoint, aws_access_key_id=FAKE_ACCESS_KEY, aws_secret_access_key=FAKE_SECRET_KEY,
        region_name=REGION,
    )
    kwargs.update(overrides)
    return boto3.client("s3", **kwargs)


def start_s3(state_dir: Path, bucket: str | None = DEFAULT_BUCKET, *, timeout: float = 30.0,
             extra_env: dict[str, str] | None = None, name: str = "moto") -> S3Info:
    """Start a moto S3 server on a free 127.0.0.1 port, wait until it answers, create `bucket`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(3):  # the free port can be taken between choosing and binding: pick another
        port = free_port()
        env = scrubbed_environ()
        env.update(extra_env or {})
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        proc = spawn(name, argv, env, state_dir / f"{name}.log")
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _exited(proc) is not None:
                last_error = f"moto server exited early:\n{log_tail(proc.log)}"
                break
            try:
                _http_get(endpoint + "/moto-api/", timeout=1.0)
            except OSError:
                time.sleep(0.1)
                continue
            info = S3Info(endpoint=endpoint, port=port, bucket=bucket, proc=proc)
            if bucket:
                try:
                    boto3_client(endpoint).create_bucket(Bucket=bucket)
                except Exception:
                    proc.stop()
                    raise
            return info
        else:
            last_error = (f"moto server did not answer on {endpoint} within {timeout:.0f}s:\n"
                          f"{log_tail(proc.log)}")
        proc.stop()
    raise StackError(last_error)


# ----------------------------------------------------------------------------------------------- Ray


@dataclass
class RayInfo:
    address: str  # dashboard / job API URL, what RAY_ADDRESS must be for `ray job ...`
    gcs_address: str
    temp_dir: str
    token_path: str
    ports: dict[str, int]
    proc: Proc

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Bearer " + Path(self.token_path).read_text().strip()}

    def client_env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, **ray_auth_env(self.token_path)}


def _new_token(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))


def _ray_logs_tail(temp_dir: str, lines: int = 30) -> str:
    logs = Path(temp_dir) / "session_latest" / "logs"
    parts = []
    for name in ("gcs_server.err", "raylet.err", "dashboard.log", "dashboard.err", "dashboard_agent.log"):
        tail = log_tail(logs / name, lines)
        if tail.strip():
            parts.append(f"--- {logs / name} ---\n{tail}")
    return "\n".join(parts)


def _ray_env(token_path: str | Path, gcs_port: int | str, extra_env: dict[str, str] | None,
             multi_node: bool = True) -> dict[str, str]:
    """The environment of every node of a local cluster (head and workers)."""
    env = scrubbed_environ()
    env.update(extra_env or {})
    env.update(ray_auth_env(token_path))
    # Job entrypoints say `python ...`: make that the venv's interpreter (the one with TensorFlow).
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "/usr/bin:/bin")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Every process of the cluster (Ray Train's PlacementGroupCleaner among them) resolves "the cluster" from
    # RAY_ADDRESS, else from /tmp/ray/ray_current_cluster, which the last `ray start` on the machine wrote
    # (--temp-dir only moves where this head writes it, not where Ray's actors read it).
    env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    # With multi-node support off, Ray keeps a single-node head on loopback (services.resolve_ip_for_localhost)
    # but refuses every node that tries to join it ("Multi-node Ray clusters are not supported").
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1" if multi_node else "0"
    # On SIGTERM, Ray 2.60 first drains the node for up to 30 s (for Serve); nothing to drain here.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return env


_NODE_PORT_FLAGS = {"node_manager": "--node-manager-port", "object_manager": "--object-manager-port",
                    "dashboard_agent_http": "--dashboard-agent-listen-port",
                    "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
                    "runtime_env_agent": "--runtime-env-agent-port", "metrics_export": "--metrics-export-port"}


def _node_ports(worker_ports: int) -> tuple[list[str], dict[str, int]]:
    """`ray start` arguments every node needs on a shared loopback: a free port for each of its services and a
    block of `worker_ports` for its workers (Ray's defaults would clash between nodes and stacks)."""
    ports = {name: free_port() for name in _NODE_PORT_FLAGS}
    ports["min_worker"], ports["max_worker"] = free_port_range(worker_ports)
    args = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats",
            "--min-worker-port", str(ports["min_worker"]), "--max-worker-port", str(ports["max_worker"])]
    for name, flag in _NODE_PORT_FLAGS.items():
        args += [flag, str(ports[name])]
    return args, ports


def start_ray_head(state_dir: Path, *, num_cpus: int = DEFAULT_NUM_CPUS,
                   extra_env: dict[str, str] | None = None, timeout: float = 120.0,
                   multi_node: bool = False) -> RayInfo:
    """Start `ray start --head --block` on 127.0.0.1 with every port chosen free; wait for the job API."""
    state_dir = state_dir.resolve()
    token_path = state_dir / TOKEN_FILE
    _new_token(token_path)
    # Short: Ray puts unix sockets under it and their paths must stay below 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ports = {name: free_port() for name in (
        "gcs", "dashboard", "client", "autoscaler_metrics", "dashboard_metrics")}
    node_args, node_ports = _node_ports(200)
    ports.update(node_ports)
    argv = [
        ray_executable(), "start", "--head", "--block",
        "--port", str(ports["gcs"]),
        "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(ports["dashboard"]),
        "--ray-client-server-port", str(ports["client"]),
        *node_args,
        "--temp-dir", temp_dir,
        "--num-cpus", str(num_cpus),
    ]
    env = _ray_env(token_path, ports["gcs"], extra_env, multi_node)
    # Prometheus ports that `ray start` has no flag for (defaults 44217/44227 would clash between stacks).
    env["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
    env["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
    proc = spawn("ray-head", argv, env, state_dir / "ray-head.log")
    info = RayInfo(
        address=f"http://127.0.0.1:{ports['dashboard']}", gcs_address=f"127.0.0.1:{ports['gcs']}",
        temp_dir=temp_dir, token_path=str(token_path), ports=ports, proc=proc,
    )
    try:
        _wait_ray_ready(info, timeout)
    except BaseException as exc:
        stop_ray_head(info)
        exc.proc = info.proc  # for callers that want to check what was stopped
        raise
    return info


def _wait_ray_ready(info: RayInfo, timeout: float) -> None:
    """Ready = the job API answers an authenticated request and the head's agent reports a healthy raylet."""
    deadline = time.monotonic() + timeout
    checks = [
        (info.address + "/api/version", info.auth_headers),
        (info.address + "/api/jobs/", info.auth_headers),
        (f"http://127.0.0.1:{info.ports['dashboard_agent_http']}/api/local_raylet_healthz", {}),
    ]
    pending = list(checks)
    last = ""
    while pending and time.monotonic() < deadline:
        code = _exited(info.proc)
        if code is not None:
            raise StackError(
                f"`ray start --head` exited with code {code}:\n{log_tail(info.proc.log)}\n"
                f"{_ray_logs_tail(info.temp_dir)}")
        url, headers = pending[0]
        try:
            status, body = _http_get(url, headers)
        except OSError as exc:
            status, body = 0, str(exc).encode()
        if status == 200:
            pending.pop(0)
            continue
        last = f"{url} -> {status} {body[:200]!r}"
        time.sleep(0.25)
    if pending:
        raise StackError(
            f"Ray head not ready within {timeout:.0f}s (last check: {last}).\n"
            f"--- {info.proc.log} ---\n{log_tail(info.proc.log)}\n{_ray_logs_tail(info.temp_dir)}")


@dataclass
class RayNode:
    """A worker node of a local cluster: `ray start --address <head> --block` in its own process group."""

    name: str
    node_id: str
    proc: Proc
    temp_dir: str = ""  # its own, as on a separate machine: its logs are forwarded once, not once per node

    def kill(self) -> None:
        """SIGKILL the whole node at once (raylet, agents, workers): a preempted machine, not a shutdown."""
        pids = self.proc.members()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pgid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _reap(self.proc.pid)

    def stop(self) -> None:
        self.proc.stop()
        if self.temp_dir and not os.environ.get("CHARLSTM_KEEP_RAY_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def alive_node_ids(info: RayInfo) -> set[str]:
    """Node ids the head's state API reports ALIVE."""
    status, body = _http_get(info.address + "/api/v0/nodes?limit=1000", info.auth_headers, timeout=10.0)
    if status != 200:
        raise StackError(f"state API /api/v0/nodes -> HTTP {status}: {body[:200]!r}")
    rows = json.loads(body)["data"]["result"]["result"]
    return {row["node_id"] for row in rows if row.get("state") == "ALIVE"}


def start_ray_node(head: RayInfo, state_dir: Path, name: str, *, num_cpus: int = 1,
                   extra_env: dict[str, str] | None = None, timeout: float = 120.0) -> RayNode:
    """Join a worker node to `head` on 127.0.0.1 (every port its own) and wait until the head lists it ALIVE.

    Start nodes one at a time: two joining together once both failed with "timed out during startup"."""
    state_dir = state_dir.resolve()
    before = alive_node_ids(head)
    node_args, _ports = _node_ports(100)
    # Short: Ray's unix sockets live under it. Sharing the head's would make every node's log monitor forward
    # every worker's lines (each line once per node in `ray job logs`) and let nodes share downloaded files.
    temp_dir = tempfile.mkdtemp(prefix="rn-", dir="/tmp")
    argv = [ray_executable(), "start", "--block", "--address", head.gcs_address, *node_args,
            "--num-cpus", str(num_cpus), "--temp-dir", temp_dir]
    env = _ray_env(head.token_path, head.gcs_address.rsplit(":", 1)[1], extra_env)
    proc = spawn(f"ray-node-{name}", argv, env, state_dir / f"ray-node-{name}.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = _exited(proc)
        if code is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise StackError(f"`ray start` of node {name} exited with code {code}:\n{log_tail(proc.log)}")
        with contextlib.suppress(OSError, StackError):
            new = alive_node_ids(head) - before
            if new:
                return RayNode(name=name, node_id=new.pop(), proc=proc, temp_dir=temp_dir)
        time.sleep(0.25)
    proc.stop()
    shutil.rmtree(temp_dir, ignore_errors=True)
    raise StackError(f"Ray node {name} did not join within {timeout:.0f}s:\n{log_tail(proc.log)}")


def stop_ray_head(info: RayInfo, *, keep_temp_dir: bool = False) -> None:
    info.proc.stop()
    if not keep_temp_dir and not os.environ.get("CHARLSTM_KEEP_RAY_LOGS"):
        shutil.rmtree(info.temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- stack


@dataclass
class Stack:
    state_dir: str
    s3: S3Info
    ray: RayInfo | None
    nodes: list[RayNode] = field(default_factory=list)  # worker nodes beside the head (a multi-node cluster)

    def client_env(self) -> dict[str, str]:
        """Everything a client shell needs: the local S3 (AWS_*) and the Ray job API (RAY_*)."""
        env = dict(self.s3.env)
        if self.ray is not None:
            env.update(self.ray.client_env())
        return env

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: str | Path) -> Stack | None:
        path = Path(state_dir) / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        s3 = raw["s3"]
        s3 = S3Info(**{**s3, "proc": Proc(**s3["proc"])})
        ray = raw.get("ray")
        if ray is not None:
            ray = RayInfo(**{**ray, "proc": Proc(**ray["proc"])})
        nodes = [RayNode(**{**n, "proc": Proc(**n["proc"])}) for n in raw.get("nodes", [])]
        return cls(state_dir=raw["state_dir"], s3=s3, ray=ray, nodes=nodes)

    def alive(self) -> dict[str, bool]:
        out = {"s3": self.s3.proc.alive()}
        if self.ray is not None:
            out["ray"] = self.ray.proc.alive()
        for node in self.nodes:
            out[f"ray-node-{node.name}"] = node.proc.alive()
        return out

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.ray is not None:
            stop_ray_head(self.ray)
        self.s3.proc.stop()


def start(state_dir: str | Path = DEFAULT_STATE_DIR, *, bucket: str = DEFAULT_BUCKET,
          num_cpus: int = DEFAULT_NUM_CPUS, uploads: list[tuple[str, str]] | None = None,
          with_ray: bool = True, worker_nodes: int = 0) -> Stack:
    """Start S3 (+ bucket, + uploads) and a Ray head; record them in `<state_dir>/state.json`.

    `worker_nodes` > 0: a multi-node cluster on this machine, a head that runs no work plus that many worker
    nodes of `num_cpus` CPUs each (each its own process group, stoppable alone)."""
    state_dir = Path(state_dir).resolve()
    existing = Stack.load(state_dir)
    if existing is not None and any(existing.alive().values()):
        raise StackError(f"a local stack is already running from {state_dir}; run `stop` first")
    s3 = start_s3(state_dir, bucket)
    stack = Stack(state_dir=str(state_dir), s3=s3, ray=None)
    stack.save()
    try:
        if uploads:
            client = boto3_client(s3.endpoint)
            for local, key in uploads:
                client.upload_file(str(local), bucket, key)
        if with_ray:
            stack.ray = start_ray_head(state_dir, num_cpus=0 if worker_nodes else num_cpus, extra_env=s3.env,
                                       multi_node=worker_nodes > 0)
            stack.save()
            for i in range(worker_nodes):  # one at a time: nodes joining together can time out
                stack.nodes.append(start_ray_node(stack.ray, state_dir, f"w{i + 1}", num_cpus=num_cpus,
                                                  extra_env=s3.env))
                stack.save()
    except BaseException:
        stack.stop()
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    return stack


def stop(state_dir: str | Path = DEFAULT_STATE_DIR) -> bool:
    """Stop what `start` recorded in `state_dir`; True if there was anything to stop. Idempotent."""
    stack = Stack.load(state_dir)
    if stack is None:
        return False
    stack.stop()
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return True


def export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.localstack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    parser.add_argument("--bucket", default=DEFAULT_BUCKET)
    parser.add_argument("--upload", nargs=2, action="append", metavar=("LOCALFILE", "KEY"), default=[],
                        help="upload LOCALFILE to s3://BUCKET/KEY after start (repeatable)")
    parser.add_argument("--num-cpus", type=int, default=DEFAULT_NUM_CPUS,
                        help="CPUs of the head, or of each worker node with --worker-nodes")
    parser.add_argument("--worker-nodes", type=int, default=0,
                        help="a multi-node cluster: a head with no CPUs plus this many worker nodes")
    args = parser.parse_args(argv)

    if args.command == "start":
        for local, _key in args.upload:
            if not Path(local).is_file():
                print(f"error: --upload file {local} does not exist", file=sys.stderr)
                return 2
        try:
            t0 = time.monotonic()
            stack = start(args.state_dir, bucket=args.bucket, num_cpus=args.num_cpus, uploads=args.upload,
                          worker_nodes=args.worker_nodes)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        detach()  # the stack outlives this command; `stop` ends it
        print(f"local S3   {stack.s3.endpoint}  bucket s3://{args.bucket}")
        print(f"Ray head   {stack.ray.address}  (token auth, {0 if args.worker_nodes else args.num_cpus} CPUs, "
              f"logs {stack.ray.temp_dir})")
        for node in stack.nodes:
            print(f"Ray node   {node.name}  ({args.num_cpus} CPUs, node id {node.node_id[:12]}, pid {node.proc.pid})")
        print(f"ready in {time.monotonic() - t0:.1f}s; for a shell: eval \"$(python -m infra.localstack env"
              f" --state-dir {args.state_dir})\"")
        return 0
    if args.command == "stop":
        print("stopped" if stop(args.state_dir) else "nothing to stop")
        return 0
    stack = Stack.load(args.state_dir)
    if stack is None:
        print(f"error: no local stack recorded in {args.state_dir}; run `start` first", file=sys.stderr)
        return 1
    if args.command == "status":
        alive = stack.alive()
        print(json.dumps({"alive": alive, "s3": stack.s3.endpoint, "bucket": stack.s3.bucket,
                          "ray": stack.ray.address if stack.ray else None}, indent=2))
        return 0 if all(alive.values()) else 1
    print(export_lines(stack.client_env()), end="")  # env
    return 0


if __name__ == "__main__":
    sys.exit(main())
