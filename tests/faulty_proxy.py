"""A fault-injecting HTTP proxy in front of the local S3 server, for the reliability tests.

    with FaultyProxy(upstream="http://127.0.0.1:PORT", fault_rate=0.2, seed=1) as proxy:
        env["AWS_ENDPOINT_URL"] = proxy.endpoint     # every S3 client of the job now goes through it

Each request is either forwarded unchanged to the upstream server, or answered with a fault *instead of*
being forwarded (so a fault never half-applies a request and a retry is always safe), one of:

    503  SlowDown        S3's throttling answer (XML error body, as S3 sends it)
    500  InternalError   S3's "we encountered an internal error. Please try again."
    drop                 the connection is closed without any answer (the client sees an empty reply)

Deterministic: whether the n-th attempt of a request is faulted, and how, depends only on (seed, method,
path, the query string without upload ids, n), not on thread timing or on which other requests ran
before. Bounded: the same request is faulted at most `max_consecutive` times in a row (then it is let
through), so a client with more attempts than that always gets through, and `max_faults` caps the total.

Threaded (one thread per client connection, HTTP/1.1 keep-alive, 100-continue), 127.0.0.1 only; `stop()`
closes the listening socket and every open client connection, so nothing outlives the `with` block.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import socket
import threading
import urllib.parse
from collections import Counter

FAULTS = ("503", "500", "drop")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "trailers", "transfer-encoding", "upgrade", "expect", "proxy-connection"}
_BODIES = {
    "503": ("SlowDown", "Please reduce your request rate."),
    "500": ("InternalError", "We encountered an internal error. Please try again."),
}


def error_body(code: str, message: str, resource: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>FAULTY0PROXY0000</RequestId></Error>").encode()


def client_family(user_agent: str) -> str:
    """Which S3 library sent a request: 'pyarrow' (AWS SDK for C++, Ray's checkpoint writer), 'botocore'
    (boto3, s3fs/aiobotocore: charlstm's own reads and writes) or 'other'."""
    ua = user_agent.lower()
    if "aws-sdk-cpp" in ua:
        return "pyarrow"
    if "botocore" in ua:
        return "botocore"
    return "other"


class FaultyProxy:
    def __init__(self, upstream: str, fault_rate: float = 0.2, seed: int = 0, max_consecutive: int = 2,
                 max_faults: int = 10_000, faults: tuple[str, ...] = FAULTS, upstream_timeout: float = 60.0):
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.fault_rate, self.seed, self.max_consecutive = fault_rate, seed, max_consecutive
        self.max_faults, self.faults, self.upstream_timeout = max_faults, faults, upstream_timeout
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()  # per request key: attempts seen so far
        self.streak: Counter[str] = Counter()  # per request key: faults in a row right now
        self.injected: Counter[tuple[str, str]] = Counter()  # (client family, fault kind) -> count
        self.forwarded: Counter[str] = Counter()  # client family -> requests let through
        self.access_keys: set[tuple[str, str]] = set()  # (client family, access key id) seen in signatures
        self.connections: set[socket.socket] = set()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "proxy not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="faulty-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            open_connections = list(self.connections)
        for conn in open_connections:  # keep-alive connections whose handler threads wait for a request
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ decisions
    @staticmethod
    def request_key(method: str, target: str) -> str:
        """method + path + query, minus the random multipart upload id (so reruns fault the same way)."""
        parts = urllib.parse.urlsplit(target)
        query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "uploadId"]
        return f"{method} {parts.path}?{urllib.parse.urlencode(sorted(query))}"

    def decide(self, key: str, family: str) -> str | None:
        """The fault for this attempt of `key`, or None to forward it."""
        with self.lock:
            n = self.attempts[key]
            self.attempts[key] += 1
            digest = hashlib.sha256(f"{self.seed}|{key}|{n}".encode()).digest()
            roll = int.from_bytes(digest[:8], "big") / 2**64
            total = sum(self.injected.values())
            if roll >= self.fault_rate or self.streak[key] >= self.max_consecutive or total >= self.max_faults:
                self.streak[key] = 0
                self.forwarded[family] += 1
                return None
            self.streak[key] += 1
            kind = self.faults[digest[8] % len(self.faults)]
            self.injected[(family, kind)] += 1
            return kind

    def injected_by_family(self) -> Counter[str]:
        with self.lock:
            out: Counter[str] = Counter()
            for (family, _kind), count in self.injected.items():
                out[family] += count
            return out

    def summary(self) -> str:
        with self.lock:
            return f"injected={dict(self.injected)} forwarded={dict(self.forwarded)}"


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: FaultyProxy
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` is answered before the body

    def setup(self) -> None:
        super().setup()
        with self.owner.lock:
            self.owner.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.owner.lock:
                self.owner.connections.discard(self.connection)

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet: the tests print the summary instead
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()  # always consume the request first, so the connection stays in sync
        family = client_family(self.headers.get("User-Agent", ""))
        credential = self.headers.get("Authorization", "").partition("Credential=")[2].split("/", 1)[0]
        if credential:
            with self.owner.lock:
                self.owner.access_keys.add((family, credential))
        fault = self.owner.decide(FaultyProxy.request_key(self.command, self.path), family)
        if fault == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)  # no status line at all: an empty reply
            except OSError:
                pass
            return
        if fault is not None:
            code, message = _BODIES[fault]
            payload = error_body(code, message, urllib.parse.urlsplit(self.path).path)
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        self._forward(body)

    def _forward(self, body: bytes) -> None:
        upstream = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port,
                                              timeout=self.owner.upstream_timeout)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)  # Host included: the SigV4 signature covers it
            if body or self.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body if body else None)
            response = upstream.getresponse()
            payload = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() in _HOP_BY_HOP or name.lower() in ("content-length", "date", "server"):
                    continue
                self.send_header(name, value)
            if self.command == "HEAD":
                length = response.getheader("Content-Length")
                if length is not None:
                    self.send_header("Content-Length", length)
            else:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD" and payload:
                self.wfile.write(payload)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
