"""The chat client against hostile servers on 127.0.0.1: redirects, trickled replies, huge replies.

The API key must never reach another address, one request must end by its deadline
whatever the server does, and a reply larger than the limit is never read whole.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from llmseg_ros.datagen.config import LLMConfig
from llmseg_ros.datagen.llm import FATAL_STATUSES, LLMRequestError, OpenAIChatClient

KEY = "sk-secret-do-not-leak"
MESSAGES = [{"role": "user", "content": "hello"}]


def _reply(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose in these tests


class Recorder:
    """A loopback HTTP server whose behaviour is chosen by the first path segment.

    ``/ok/...`` answers a chat reply; ``/redirect-<code>/...`` redirects to ``target``;
    ``/trickle/...`` sends a declared 60-byte reply one byte every 0.25 s, and
    ``/trickle-headers/...`` its status line and headers that way;
    ``/huge/...`` streams ``huge_bytes`` of a valid reply (``Content-Length`` declared
    or not). ``requests`` keeps (path, headers) of every request; ``sent`` the body bytes
    written per path before the client hung up.
    """

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.sent: dict[str, int] = {}
        self.target = ""
        self.huge_bytes = 50 << 20
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                recorder.requests.append((self.path, dict(self.headers)))
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                recorder.requests.append((self.path, dict(self.headers)))
                recorder.serve(self)

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile=tls[0], keyfile=tls[1])
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _body(self, handler: BaseHTTPRequestHandler, chunks: Iterator[bytes]) -> None:
        sent = 0
        try:
            for chunk in chunks:
                handler.wfile.write(chunk)
                handler.wfile.flush()
                sent += len(chunk)
        except OSError:
            pass  # the client hung up
        finally:
            self.sent[handler.path] = sent

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        kind = handler.path.split("/")[1]
        if kind == "ok":
            body = _reply("fine")
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        elif kind.startswith("redirect-"):
            handler.send_response(int(kind.split("-")[1]))
            handler.send_header("Location", self.target)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif kind == "trickle-headers":
            head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"z" * 20) for i in range(20))

            def headers_slowly() -> Iterator[bytes]:
                for i in range(len(head)):
                    yield head[i : i + 1]
                    time.sleep(0.25)

            self._body(handler, headers_slowly())
        elif kind == "trickle":
            body = _reply("x" * 10).ljust(60)
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()

            def slowly() -> Iterator[bytes]:
                for i in range(len(body)):
                    yield body[i : i + 1]
                    time.sleep(0.25)

            self._body(handler, slowly())
        elif kind in ("huge", "huge-undeclared"):
            head, tail = b'{"choices": [{"message": {"role": "assistant", "content": "', b'"}}]}'
            filler = self.huge_bytes - len(head) - len(tail)
            handler.send_response(200)
            if kind == "huge":
                handler.send_header("Content-Length", str(self.huge_bytes))
            else:
                handler.send_header("Connection", "close")  # body ends when the connection does
            handler.end_headers()

            def stream() -> Iterator[bytes]:
                yield head
                block = b"y" * (1 << 16)
                for start in range(0, filler, len(block)):
                    yield block[: min(len(block), filler - start)]
                yield tail

            self._body(handler, stream())


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    recorder = Recorder()
    yield recorder
    recorder.close()


@pytest.fixture
def elsewhere(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """A second server: another origin (another port)."""
    recorder = Recorder()
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # the client's default context trusts it
    recorder = Recorder(tls=certificate)
    yield recorder
    recorder.close()


def _client(base_url: str, **kwargs: Any) -> OpenAIChatClient:
    options: dict[str, Any] = {"max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.02, **kwargs}
    return OpenAIChatClient(base_url, "m", KEY, **options)


def test_a_plain_reply_still_works(server: Recorder) -> None:
    result = _client(f"{server.url}/ok/v1").complete(MESSAGES)
    assert result.text == "fine" and server.requests[0][1]["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_refused_and_the_key_goes_nowhere_else(
    server: Recorder, elsewhere: Recorder, code: int
) -> None:
    server.target = f"{elsewhere.url}/ok/v1/chat/completions"
    with pytest.raises(LLMRequestError, match=f"HTTP {code}: the server redirects to .*not followed") as err:
        _client(f"{server.url}/redirect-{code}/v1").complete(MESSAGES)
    assert err.value.status == code and err.value.status in FATAL_STATUSES  # a URL to fix: the run stops
    assert elsewhere.requests == []  # neither the body nor the Authorization header left for the other origin
    assert len(server.requests) == 1  # and it is not retried


def test_a_same_origin_redirect_is_not_followed_either(server: Recorder) -> None:
    server.target = f"{server.url}/ok/v1/chat/completions"
    with pytest.raises(LLMRequestError, match="HTTP 302"):
        _client(f"{server.url}/redirect-302/v1").complete(MESSAGES)
    assert [path for path, _ in server.requests] == ["/redirect-302/v1/chat/completions"]


def test_a_trickled_reply_is_abandoned_at_the_deadline(server: Recorder) -> None:
    client = _client(f"{server.url}/trickle/v1", timeout_s=1.0, deadline_s=1.5)
    with pytest.raises(LLMRequestError, match=r"no complete reply within the deadline of 1.5 s") as err:
        client.complete(MESSAGES)
    assert err.value.attempts == 1  # the deadline covers the retries too: none is started
    deadline = time.monotonic() + 10
    while "/trickle/v1/chat/completions" not in server.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    # the server got to send only part of the 60 bytes before the client hung up
    assert server.sent["/trickle/v1/chat/completions"] < 60


@pytest.mark.parametrize("kind", ["trickle", "trickle-headers"])
def test_over_tls_too_a_reply_arrives_or_the_deadline_ends_the_request(
    tls_server: Recorder, kind: str
) -> None:
    assert _client(f"{tls_server.url}/ok/v1").complete(MESSAGES).text == "fine"
    with pytest.raises(LLMRequestError, match=r"no complete reply within the deadline of 1.5 s"):
        _client(f"{tls_server.url}/{kind}/v1", timeout_s=1.0, deadline_s=1.5).complete(MESSAGES)


def test_trickled_headers_end_at_the_deadline(server: Recorder) -> None:
    with pytest.raises(LLMRequestError, match=r"no complete reply within the deadline of 1.5 s"):
        _client(f"{server.url}/trickle-headers/v1", timeout_s=1.0, deadline_s=1.5).complete(MESSAGES)
    deadline = time.monotonic() + 10
    while "/trickle-headers/v1/chat/completions" not in server.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.sent["/trickle-headers/v1/chat/completions"] < 400  # hung up long before the headers ended


@pytest.mark.parametrize("kind", ["huge", "huge-undeclared"])
def test_a_huge_reply_is_refused_without_reading_it_whole(server: Recorder, kind: str) -> None:
    client = _client(f"{server.url}/{kind}/v1", max_reply_bytes=1 << 20)
    with pytest.raises(LLMRequestError, match=r"limit of 1048576 bytes \(max_reply_bytes\)") as err:
        client.complete(MESSAGES)
    assert err.value.attempts == 1
    path = f"/{kind}/v1/chat/completions"
    deadline = time.monotonic() + 20
    while path not in server.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.sent[path] < server.huge_bytes // 2  # the client hung up long before the end


def test_deadline_and_reply_limit_are_settings_with_defaults() -> None:
    config = LLMConfig()
    assert config.deadline_s == 600.0 and config.max_reply_bytes == 8 << 20
    client = OpenAIChatClient.from_config(
        LLMConfig(base_url="http://x/v1", deadline_s=5, max_reply_bytes=10), {}
    )
    assert (client.deadline_s, client.max_reply_bytes) == (5, 10)
    for bad, message in (
        ({"deadline_s": 0}, "deadline_s must be a finite number of seconds > 0"),
        ({"deadline_s": float("inf")}, "deadline_s must be a finite number of seconds > 0"),
        ({"timeout_s": float("nan")}, "timeout_s must be a finite number of seconds > 0"),
        ({"max_reply_bytes": 0}, "max_reply_bytes must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            LLMConfig(**bad)
