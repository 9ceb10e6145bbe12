"""The Hugging Face hub as seen from this machine: is a model cached, can the hub be reached,
and the command that downloads a model.

Used to answer "offline and not in the local cache" before any model loads (the hub client
would otherwise retry each request for 20 s or more before giving up) and to phrase
download hints with a command the installed ``huggingface_hub`` provides: its CLI is ``hf``
(since 0.34); ``huggingface-cli`` was removed in 1.0, the oldest release ``transformers`` 5
and this package accept.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

HUB_CLI = "hf"
CONNECT_TIMEOUT_S = 3.0


def download_command(repo_id: str, local_dir: str | Path | None = None) -> str:
    """The shell command that downloads hub model ``repo_id`` (into ``local_dir`` when given)."""
    command = f"{HUB_CLI} download {repo_id}"
    return command if local_dir is None else f"{command} --local-dir {local_dir}"


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of hub model ``repo_id`` in the local hub cache (``HF_HUB_CACHE``), or ``None``.

    Looks on disk only. A snapshot counts when it holds ``config.json``, which
    ``transformers`` reads first: without it the model cannot load offline.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):  # not cached, or not a valid hub id at all
        return None
    return folder if (folder / "config.json").is_file() else None


def _probe_target(endpoint: str) -> tuple[str, int]:
    """The host and port a connection to ``endpoint`` opens first (its proxy when one applies)."""
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or endpoint
    port = url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parsed.hostname:
            return parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    return host, port


def unreachable_reason(timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used right now, or ``None`` when a connection to it opens.

    Offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) answers at once; otherwise a
    TCP connection to the hub endpoint (``HF_ENDPOINT``, or its proxy) is tried, name lookup
    included, for at most ``timeout_s`` seconds: a lookup that hangs cannot stall the caller.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode: HF_HUB_OFFLINE is set"
    host, port = _probe_target(constants.ENDPOINT)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    error = outcome[0]
    if error is None:
        return None
    detail = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"cannot connect to {host}:{port}: {detail}"
