"""A fault-injecting HTTP proxy for the Docker socket (tests only).

    daemon --DOCKER_HOST=unix://PROXY--> FaultProxy --unix://ENGINE--> dockerd

It forwards every request to the engine's socket and answers the daemon with what the
engine said, except where a rule the test set says otherwise. A rule matches a method and
a regular expression that must match the whole path without the API version prefix
docker-py adds and without the query (`/v1.41/networks/abc?x=1` is matched as
`/networks/abc`), and does one thing:

    DELAY     wait `arg` seconds, then forward as usual
    ERROR     answer `arg` (default 500) with a Docker-style JSON error, engine not asked
    RESET     close the connection without answering (a TCP-style reset: SO_LINGER 0);
              added while a matching stream (the event stream) is being relayed, it cuts it
    TRUNCATE  forward, then send the engine's headers and only `arg` bytes of its body
              (default half) and close: the client sees the connection break mid-body
    REWRITE   forward, then answer `arg(json_body)`: a JSON value (sent as JSON) or
              bytes/str (sent as they are, e.g. to answer something that is not JSON)

for `times` matching requests, or until cleared (`times=None`). Rules are tried in the
order they were added; the first live one that matches applies.

Answers with a Content-Length are read whole and sent with one, so client connections
stay alive as docker-py expects. Answers without one (the event stream: chunked and
long-lived) are relayed live, chunk by chunk, and the client connection is closed after.

Requests with a chunked body are refused (501): the daemon never sends one.
Every wait is bounded; close() ends every connection and thread it started.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import re
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

DELAY, ERROR, RESET, TRUNCATE, REWRITE = "delay", "error", "reset", "truncate", "rewrite"
ACTIONS = (DELAY, ERROR, RESET, TRUNCATE, REWRITE)
BUFFERING = (TRUNCATE, REWRITE)    # actions that need the engine's whole answer first

UPSTREAM_TIMEOUT = 30      # seconds the engine may take to answer a (non-streaming) call
IDLE_TIMEOUT = 120         # a kept-alive client connection with no request for this long ends
MAX_BODY = 32 * 1024 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length"}
VERSION_PREFIX = re.compile(r"^/v\d+(?:\.\d+)?(?=/)")


def api_path(raw_path):
    """'/v1.41/networks/abc?verbose=1' -> '/networks/abc'."""
    return VERSION_PREFIX.sub("", urllib.parse.urlsplit(raw_path).path)


@dataclass
class Rule:
    method: str                 # "GET", ... or "*" for any
    path: str                   # regex, matched against the whole api_path()
    action: str
    arg: Any = None
    times: int | None = None    # None: until cleared
    hits: int = 0               # matching requests (or streams) this rule acted on

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {ACTIONS}")
        self._regex = re.compile(self.path)

    def matches(self, method, path):
        return self.method in ("*", method) and self._regex.fullmatch(path) is not None

    @property
    def live(self):
        return self.times is None or self.hits < self.times


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path
        # http.client lets go of .sock once an answer says "Connection: close" (the
        # answer's reader keeps it open): keep our own handle to cut it.
        self.unix_sock = None

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = self.unix_sock = sock

    def cut(self):
        with contextlib.suppress(OSError, AttributeError):
            self.unix_sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server: _Server

    def log_message(self, *args):
        pass  # the proxy keeps its own record (FaultProxy.journal)

    def handle(self):
        try:
            super().handle()
        except (OSError, http.client.HTTPException) as exc:
            # the client or the engine went away (or a rule cut them): nothing to answer
            self.server.proxy.journal.append((
                time.monotonic(), getattr(self, "command", "-"),
                api_path(getattr(self, "path", "-")), f"ended: {exc!r}"))

    def _any(self):
        proxy = self.server.proxy
        path = api_path(self.path)
        rule = proxy.take(self.command, path)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._error(501, "faultproxy: chunked request bodies are not supported")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        action = rule.action if rule else None
        if action == DELAY and proxy.stopping.wait(rule.arg):
            return self._reset()
        if action == ERROR:
            return self._error(rule.arg or 500, f"faultproxy: injected error for "
                                                f"{self.command} {path}")
        if action == RESET:
            return self._reset()
        upstream = _UnixHTTPConnection(proxy.upstream, UPSTREAM_TIMEOUT)
        with proxy.tracking(upstream=upstream):
            self._forward(upstream, body)
            response = upstream.getresponse()
            if action in BUFFERING:
                return self._answer_changed(response, rule)
            if response.getheader("Content-Length") is not None or self._bodyless(response):
                return self._answer(response, response.read(MAX_BODY))
            self._relay(response, upstream, path)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

    def _forward(self, upstream, body):
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for key, value in self.headers.items():
            if key.lower() not in HOP_BY_HOP:
                upstream.putheader(key, value)
        upstream.putheader("Connection", "close")
        if body or self.command in ("POST", "PUT"):
            upstream.putheader("Content-Length", str(len(body)))
        upstream.endheaders(body or None)

    def _bodyless(self, response):
        return self.command == "HEAD" or response.status in (204, 304) or response.status < 200

    def _head(self, response, extra):
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()

    def _answer(self, response, body):
        extra = {} if self._bodyless(response) else {"Content-Length": str(len(body))}
        self._head(response, extra)
        self.wfile.write(body)

    def _answer_changed(self, response, rule):
        body = response.read(MAX_BODY)
        if rule.action == TRUNCATE:
            keep = len(body) // 2 if rule.arg is None else min(int(rule.arg), len(body))
            self._head(response, {"Content-Length": str(len(body)), "Connection": "close"})
            self.wfile.write(body[:keep])
            self.wfile.flush()
            return self._reset()
        changed = rule.arg(json.loads(body))
        if isinstance(changed, str):
            changed = changed.encode()
        elif not isinstance(changed, bytes):
            changed = json.dumps(changed).encode()
        return self._answer(response, changed)

    def _relay(self, response, upstream, path):
        """Pass a body of unknown length (the event stream) through as it comes."""
        upstream.unix_sock.settimeout(None)  # bounded by the engine, a RESET rule or close()
        self.close_connection = True
        self._head(response, {"Transfer-Encoding": "chunked", "Connection": "close"})
        self.wfile.flush()
        self._upstream = upstream
        with self.server.proxy.tracking(stream=(self.command, path, self)):
            while True:
                data = response.read1(65536)
                if not data:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

    def _error(self, status, message):
        body = json.dumps({"message": message}).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def cut(self):
        """End a relayed stream from another thread: both ends, at once."""
        self._reset()
        self._upstream.cut()

    def _reset(self):
        """Drop the connection without a word: RST rather than FIN."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(socketserver.UnixStreamServer):
    """One thread per client connection, each tracked so that close() can end it."""

    def __init__(self, path, proxy):
        self.proxy = proxy
        super().__init__(path, _Handler)

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self._serve, args=(request, client_address),
                                  name="faultproxy-conn", daemon=True)
        self.proxy.opened(request, thread)
        thread.start()

    def _serve(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception as exc:  # noqa: BLE001 - one broken connection must not stop the proxy
            self.proxy.journal.append((time.monotonic(), "-", "-", f"proxy error: {exc!r}"))
        finally:
            self.shutdown_request(request)
            self.proxy.closed(request)


class FaultProxy:
    """Listen on `path`, forward to the engine socket `upstream`, apply the test's rules."""

    def __init__(self, upstream, path):
        self.upstream = str(upstream)
        self.path = str(path)
        self.url = f"unix://{self.path}"
        self.stopping = threading.Event()
        self.counts = collections.Counter()          # (method, api path) -> requests
        self.journal = collections.deque(maxlen=2000)  # (monotonic, method, path, action)
        self._rules = []
        self._lock = threading.Lock()
        self._conns = {}        # client socket -> its thread
        self._upstreams = set()
        self._streams = set()   # (method, path, handler) relayed live now
        self._server = None
        self._thread = None

    # life -------------------------------------------------------------------------
    def start(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = _Server(self.path, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.1}, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout=5.0):
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            conns = dict(self._conns)
            upstreams = list(self._upstreams)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for upstream in upstreams:
            upstream.cut()
        deadline = time.monotonic() + timeout
        for thread in list(conns.values()) + ([self._thread] if self._thread else []):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # rules --------------------------------------------------------------------------
    def add(self, method, path, action, arg=None, times=None):
        """Add a rule (see the module's docstring); returns it, so a test can read its hits."""
        rule = Rule(method, path, action, arg, times)
        with self._lock:
            self._rules.append(rule)
            cut = []
            if action == RESET:
                for stream in list(self._streams):
                    if rule.live and rule.matches(stream[0], stream[1]):
                        rule.hits += 1
                        cut.append(stream[2])
        for handler in cut:
            self.journal.append((time.monotonic(), handler.command, api_path(handler.path),
                                 "cut"))
            handler.cut()
        return rule

    def delay(self, method, path, seconds, times=None):
        return self.add(method, path, DELAY, seconds, times)

    def error(self, method, path, status=500, times=None):
        return self.add(method, path, ERROR, status, times)

    def reset(self, method, path, times=None):
        return self.add(method, path, RESET, None, times)

    def truncate(self, method, path, keep=None, times=None):
        return self.add(method, path, TRUNCATE, keep, times)

    def rewrite(self, method, path, fn, times=None):
        return self.add(method, path, REWRITE, fn, times)

    def clear(self, rule=None):
        """Remove one rule, or all of them."""
        with self._lock:
            self._rules = [] if rule is None else [r for r in self._rules if r is not rule]

    def take(self, method, path):
        """Count a request and return the rule that applies to it (one hit used), or None."""
        with self._lock:
            self.counts[(method, path)] += 1
            for rule in self._rules:
                if rule.live and rule.matches(method, path):
                    rule.hits += 1
                    self.journal.append((time.monotonic(), method, path, rule.action))
                    return rule
        self.journal.append((time.monotonic(), method, path, "forward"))
        return None

    def count(self, method, path):
        """Requests so far whose method and api path match (path: a regex, whole path)."""
        regex = re.compile(path)
        with self._lock:
            return sum(n for (m, p), n in self.counts.items()
                       if method in ("*", m) and regex.fullmatch(p))

    def history(self, last=40):
        """The last requests as text, for failure messages."""
        start = self.journal[0][0] if self.journal else 0
        return "\n".join(f"{t - start:8.3f} {m} {p} {a}"
                         for t, m, p, a in list(self.journal)[-last:])

    # bookkeeping for close() ------------------------------------------------------------
    def opened(self, sock, thread):
        with self._lock:
            self._conns[sock] = thread

    def closed(self, sock):
        with self._lock:
            self._conns.pop(sock, None)

    @contextlib.contextmanager
    def tracking(self, upstream=None, stream=None):
        with self._lock:
            if upstream is not None:
                self._upstreams.add(upstream)
            if stream is not None:
                self._streams.add(stream)
        try:
            yield
        finally:
            with self._lock:
                self._upstreams.discard(upstream)
                self._streams.discard(stream)
            if upstream is not None:
                upstream.close()
