"""Download the foundation weights (SAM, DINOv2, the VLM) on a connected machine.

SAM comes from its official release URL; the tag in each file name (``sam_vit_h_4b8939``)
is the start of the file's published MD5 digest and is checked after download. DINOv2
and the VLM come through ``huggingface_hub`` (which checks its own file hashes). Every
file is downloaded to a temporary name and renamed when complete. A failed download does
not stop the others: :func:`fetch_all` reports every file it could not get, each with
where to get it.
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
from llmseg_ros.utils.hub import download_command

SAM_RELEASE = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_FILES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}


class FetchError(RuntimeError):
    """A download failed; the message names the file, the source and what to do.

    Attributes:
        reason: what went wrong (one line).
        remedy: how to get the file anyway (e.g. on another machine).
    """

    def __init__(self, reason: str, remedy: str) -> None:
        super().__init__(f"{reason}. {remedy}")
        self.reason, self.remedy = reason, remedy


@dataclass(frozen=True)
class FetchFailure:
    """One thing :func:`fetch_all` could not get.

    Attributes:
        name: what it is (``"SAM vit_h checkpoint"``, a hub id).
        destination: where it belongs.
        reason: what went wrong.
        remedy: where to get it and where to put it.
    """

    name: str
    destination: Path
    reason: str
    remedy: str


@dataclass
class FetchResult:
    """What :func:`fetch_all` got (name → local path; SAM under ``"sam"``) and what it could not."""

    paths: dict[str, Path]
    failures: list[FetchFailure]

    def failure_report(self) -> str:
        """Every failure with where to get the file (empty when nothing failed)."""
        if not self.failures:
            return ""
        total = len(self.failures) + len(self.paths)
        lines = [f"could not get {len(self.failures)} of {total} models:"]
        for failure in self.failures:
            lines += [f"  - {failure.name}: {failure.reason}", f"      get it: {failure.remedy}"]
        return "\n".join(lines)


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


def hub_model_dir(directory: Path, repo_id: str) -> Path:
    """Where hub model ``repo_id`` goes under ``directory`` (``owner/name`` → ``directory/name``)."""
    return directory / repo_id.split("/")[-1]


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
                f"cannot download {url} ({exc}); this machine seems to be offline or the URL is blocked",
                f"download {url} on a connected machine and copy it to {dest}",
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
                f"{expected_md5_prefix}; the download is corrupt",
                f"try again, or download the file elsewhere and copy it to {dest}",
            )
        publish(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def snapshot(repo_id: str, target: Path, patterns: tuple[str, ...] | None = None) -> Path:
    """Download hub model ``repo_id`` (only the files matching ``patterns`` when given) into
    ``target``; resumable, hash-checked by the hub client."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            repo_id=repo_id,
            local_dir=str(target),
            allow_patterns=None if patterns is None else list(patterns),
        )
    except Exception as exc:  # the hub client raises many types for offline/forbidden
        first_line = (str(exc).strip().splitlines() or [""])[0]
        files = "" if patterns is None else f" (files {', '.join(patterns)})"
        raise FetchError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(exc).__name__}: {first_line})",
            f"on a connected machine run `{download_command(repo_id, target.name)}`{files} and copy the "
            f"folder to {target}",
        ) from exc
    return target


def fetch_hub_model(repo_id: str, directory: Path) -> Path:
    """Snapshot a hub model into ``directory/<name>`` (see :func:`snapshot`)."""
    return snapshot(repo_id, hub_model_dir(directory, repo_id))


def fetch_all(plan: FetchPlan, log: Callable[[str], None] = print) -> FetchResult:
    """Download everything in ``plan``, going on past failures.

    Returns:
        the local path of everything present afterwards (SAM under ``"sam"``, hub models
        under their id) and one :class:`FetchFailure` per file it could not get.
    """
    result = FetchResult({}, [])
    if plan.sam_model_type is not None:
        name = SAM_FILES[plan.sam_model_type]
        dest = sam_checkpoint_path(plan.directory, plan.sam_model_type)
        if dest.is_file():
            log(f"SAM checkpoint already present: {dest}")
            result.paths["sam"] = dest
        else:
            log(f"downloading SAM {plan.sam_model_type} checkpoint from {SAM_RELEASE + name}")
            try:
                result.paths["sam"] = download_url(
                    SAM_RELEASE + name, dest, expected_md5_prefix=md5_tag(name)
                )
            except FetchError as exc:
                what = f"SAM {plan.sam_model_type} checkpoint {name}"
                result.failures.append(FetchFailure(what, dest, exc.reason, exc.remedy))
    for repo_id in plan.hub_models:
        log(f"downloading {repo_id} from the Hugging Face hub")
        try:
            result.paths[repo_id] = fetch_hub_model(repo_id, plan.directory)
        except FetchError as exc:
            dest = hub_model_dir(plan.directory, repo_id)
            result.failures.append(FetchFailure(repo_id, dest, exc.reason, exc.remedy))
    return result
