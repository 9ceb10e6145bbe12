"""Shared fixtures: one tiny profile (tiny random SAM, DINOv2, LLaVA, Qwen2.5-VL, Grounding
DINO and untrained heads) built once per test session and loaded through the real code."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Undo a side effect of ROS 2's launch_testing pytest plugin (loaded when ROS 2 is sourced).

    The plugin imports ``launch``, whose logging module makes every logger created from
    then on a non-propagating ``LaunchLogger``: the package's log records would never reach
    the root logger, so ``caplog`` and ``-o log_cli`` would see nothing. The package's
    loggers are created later, when the test modules import it, as plain loggers again.
    """
    launch_logging = sys.modules.get("launch.logging")
    if launch_logging is not None and logging.getLoggerClass() is getattr(
        launch_logging, "LaunchLogger", None
    ):
        logging.setLoggerClass(logging.Logger)


@pytest.fixture(scope="session")
def tiny_profile_dir(tmp_path_factory):
    from llmseg_ros.tiny import build_tiny_profile

    directory = tmp_path_factory.mktemp("tiny_profile") / "tiny"
    build_tiny_profile(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_config_factory(tiny_profile_dir):
    from llmseg_ros.tiny import build_tiny_profile

    def make(method: str = "llmseg"):
        return build_tiny_profile(tiny_profile_dir, method=method)

    return make


@pytest.fixture
def scene_image() -> np.ndarray:
    """A small RGB scene (three flat shapes on a gradient), (96, 128, 3) uint8."""
    import cv2

    h, w = 96, 128
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = np.linspace(40, 200, w, dtype=np.uint8)[None, :, None]
    cv2.circle(img, (30, 40), 15, (220, 30, 30), -1)
    cv2.rectangle(img, (60, 20), (100, 60), (30, 200, 40), -1)
    cv2.fillPoly(img, [np.array([[20, 90], [50, 65], [80, 90]], np.int32)], (30, 40, 220))
    return img


@pytest.fixture(scope="module")
def tracking_segmenter(tiny_config_factory, tmp_path_factory):
    """The tiny llmseg profile with a tiny SAM at 256 px input (16x cheaper to encode than
    its 1024), for the tracking tests."""
    from llmseg_ros.pipeline import ReasonSegmenter
    from llmseg_ros.tiny.sam import save_tiny_sam

    sam = save_tiny_sam(tmp_path_factory.mktemp("sam256") / "sam_tiny_256.pth", image_size=256)
    segmenter = ReasonSegmenter(tiny_config_factory("llmseg").replace(sam_checkpoint=str(sam)))
    yield segmenter
    segmenter.close()
