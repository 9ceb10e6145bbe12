"""One bounded HTTP exchange for the chat client: total deadline, size cap, no redirects.

``urllib`` alone bounds each socket operation (``timeout``), not a request: a server that
trickles one byte every half second keeps a request alive indefinitely, and ``read()``
takes a reply of any size into memory. It also follows redirects to other hosts with the
request's headers, API key included. :func:`post` closes that:

* a :class:`Deadline` watches the connection's socket and shuts it down when the
  request's wall-clock budget is spent (connect, TLS handshake, headers and body alike);
* the body is read in chunks and refused past ``max_bytes`` (and at once when
  ``Content-Length`` says so);
* redirects are never followed: a 3xx answer comes back as an ``HTTPError``, so the
  request body and the ``Authorization`` header go nowhere but the configured URL.

Proxies from the environment (``https_proxy`` ...) keep working: only the connection
classes and the redirect handler of the default ``urllib`` opener are replaced.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from typing import Any

READ_CHUNK = 1 << 16


class DeadlineExceeded(OSError):
    """The request's total deadline passed before a complete reply arrived."""


class ReplyTooLarge(ValueError):
    """The reply body is larger than the allowed size."""


class Deadline:
    """A wall-clock budget for one request; when it is spent, every watched socket is shut down.

    Shutting a socket down wakes a thread blocked reading it (the read sees the end of the
    stream), so no phase of the exchange can outlive the budget.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left (0 when spent)."""
        return max(0.0, self.end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the deadline passes (at once if it already has)."""
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def cancel(self) -> None:
        """Stop the timer (the request is over)."""
        self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        # the plain socket method, also for TLS sockets: it only touches the descriptor
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _shorten(timeout: Any, deadline: Deadline) -> Any:
    """A socket timeout no longer than what is left of ``deadline`` (others are left as they are)."""
    if isinstance(timeout, int | float):
        return max(1e-3, min(float(timeout), deadline.remaining()))
    return timeout


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def _connect_tcp(self) -> None:
        self.timeout = _shorten(self.timeout, self._deadline)
        http.client.HTTPConnection.connect(self)  # TCP (and a proxy tunnel), nothing more
        self._deadline.watch(self.sock)

    def connect(self) -> None:
        self._connect_tcp()


class _DeadlineHTTPSConnection(_DeadlineHTTPConnection, http.client.HTTPSConnection):
    def connect(self) -> None:
        # HTTPSConnection.connect, with the socket watched before the TLS handshake starts.
        self._connect_tcp()
        server_hostname = getattr(self, "_tunnel_host", None) or self.host
        context = self._context  # type: ignore[attr-defined]
        self.sock = context.wrap_socket(
            self.sock, server_hostname=server_hostname, do_handshake_on_connect=False
        )
        self._deadline.watch(self.sock)
        self.sock.do_handshake()


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(partial(_DeadlineHTTPConnection, deadline=self._deadline), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(
            partial(_DeadlineHTTPSConnection, deadline=self._deadline),
            req,
            context=self._context,  # type: ignore[attr-defined]
        )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hands every 3xx back to the caller as an ``HTTPError`` instead of following it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def read_body(response: Any, max_bytes: int, deadline: Deadline) -> bytes:
    """Read a whole response body, at most ``max_bytes``, before ``deadline``.

    Raises:
        ReplyTooLarge: the body (or its declared ``Content-Length``) exceeds ``max_bytes``.
        DeadlineExceeded: the deadline passed (a body cut short by it is never returned).
    """
    declared = response.headers.get("Content-Length") if response.headers else None
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise ReplyTooLarge(f"the reply declares {int(declared)} bytes, over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := response.read(READ_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ReplyTooLarge(f"the reply is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException):
        if deadline.expired:
            raise DeadlineExceeded(
                f"no complete reply within the deadline of {deadline.seconds:g} s"
            ) from None
        raise
    if deadline.expired:  # the socket was shut down: what arrived may be a truncated body
        raise DeadlineExceeded(f"no complete reply within the deadline of {deadline.seconds:g} s")
    return b"".join(chunks)


def post(
    request: urllib.request.Request, *, timeout_s: float, deadline: Deadline, max_bytes: int
) -> tuple[int, bytes]:
    """Send ``request`` and read the whole reply within ``deadline``.

    Args:
        request: the prepared request (method, headers, body).
        timeout_s: limit of one socket operation (seconds), shortened to the time left.
        deadline: the request's total budget, see :class:`Deadline`.
        max_bytes: largest body accepted.

    Returns:
        ``(status, body)`` of a 2xx answer.

    Raises:
        urllib.error.HTTPError: a non-2xx answer, 3xx included (its body is not read).
        DeadlineExceeded, ReplyTooLarge: see :func:`read_body`.
        OSError, http.client.HTTPException: connection-level failures.
    """
    opener = urllib.request.build_opener(
        _DeadlineHTTPHandler(deadline), _DeadlineHTTPSHandler(deadline), _NoRedirects()
    )
    if deadline.remaining() <= 0:
        raise DeadlineExceeded(f"no complete reply within the deadline of {deadline.seconds:g} s")
    try:
        with opener.open(request, timeout=max(1e-3, min(timeout_s, deadline.remaining()))) as response:
            return int(response.status), read_body(response, max_bytes, deadline)
    except (OSError, http.client.HTTPException) as exc:
        if deadline.expired and not isinstance(exc, DeadlineExceeded | urllib.error.HTTPError):
            raise DeadlineExceeded(
                f"no complete reply within the deadline of {deadline.seconds:g} s"
            ) from exc
        raise
