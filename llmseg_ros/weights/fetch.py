"""Download the foundation weights (SAM, DINOv2, the VLM) on a connected machine.

SAM comes from its official release URL; the tag in each file name (``sam_vit_h_4b8939``)
is the start of the file's published MD5 digest and is checked after download. DINOv2
and the VLM come through ``huggingface_hub`` (which checks its own file hashes). Every
file is downloaded to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmseg_ros.utils.atomic import publish

SAM_RELEASE = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_FILES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}


class FetchError(RuntimeError):
    """A download failed; the message names the file, the source and what to do."""


@dataclass
class FetchPlan:
    """What to download and where.

    Attributes:
        directory: destination root.
        sam_model_type: ``vit_h`` | ``vit_l`` | ``vit_b``, or ``None`` to skip SAM.
        hub_models: hub ids to snapshot (DINOv2, VLM, ...), each into ``directory/<name>``.
    """

    directory: Path
    sam_model_type: str | None = "vit_h"
    hub_models: tuple[str, ...] = ("facebook/dinov2-large", "llava-hf/llava-1.5-7b-hf")

    def __post_init__(self) -> None:
        if self.sam_model_type is not None and self.sam_model_type not in SAM_FILES:
            raise ValueError(
                f"sam_model_type must be one of {sorted(SAM_FILES)}, got {self.sam_model_type!r}"
            )


def sam_checkpoint_path(directory: Path, model_type: str) -> Path:
    return directory / SAM_FILES[model_type]


def md5_tag(file_name: str) -> str:
    """The checksum tag in an official SAM file name (``sam_vit_h_4b8939.pth`` → ``4b8939``)."""
    return Path(file_name).stem.rsplit("_", 1)[-1]


def download_url(
    url: str,
    dest: Path,
    *,
    expected_md5_prefix: str | None = None,
    opener: Callable[..., Any] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; atomic; optional MD5-prefix check.

    ``opener`` defaults to ``urllib.request.urlopen`` (looked up at call time).
    """
    opener = opener or urllib.request.urlopen
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        try:
            response = opener(url, timeout=60)
        except (urllib.error.URLError, OSError) as exc:
            raise FetchError(
                f"cannot download {url} ({exc}). This machine seems to be offline or the URL is blocked: "
                f"download the file on a connected machine and copy it to {dest}"
            ) from exc
        with response as src, os.fdopen(fd, "wb") as out:
            total = int(src.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if expected_md5_prefix and not digest.hexdigest().startswith(expected_md5_prefix):
            raise FetchError(
                f"checksum mismatch for {url}: MD5 {digest.hexdigest()} does not start with "
                f"{expected_md5_prefix}; the download is corrupt, try again"
            )
        publish(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def fetch_hub_model(repo_id: str, directory: Path) -> Path:
    """Snapshot a hub model into ``directory/<name>`` (resumable, hash-checked by the hub client)."""
    from huggingface_hub import snapshot_download

    target = directory / repo_id.split("/")[-1]
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(target))
    except Exception as exc:  # the hub client raises many types for offline/forbidden
        raise FetchError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"On an offline machine, download it elsewhere (`huggingface-cli download {repo_id} "
            f"--local-dir {target}`) and copy the folder here"
        ) from exc
    return target


def fetch_all(plan: FetchPlan, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Download everything in ``plan``; returns name → local path (SAM under ``"sam"``)."""
    paths: dict[str, Path] = {}
    if plan.sam_model_type is not None:
        name = SAM_FILES[plan.sam_model_type]
        dest = sam_checkpoint_path(plan.directory, plan.sam_model_type)
        if dest.is_file():
            log(f"SAM checkpoint already present: {dest}")
        else:
            log(f"downloading SAM {plan.sam_model_type} checkpoint from {SAM_RELEASE + name}")
            download_url(SAM_RELEASE + name, dest, expected_md5_prefix=md5_tag(name))
        paths["sam"] = dest
    for repo_id in plan.hub_models:
        log(f"downloading {repo_id} from the Hugging Face hub")
        paths[repo_id] = fetch_hub_model(repo_id, plan.directory)
    return paths
