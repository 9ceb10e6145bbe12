"""Offline training support: proposal caches, the data mix, the training loop, checkpoints.

The scripts under ``training/`` (``precompute.py``, ``train.py``) are thin command-line
wrappers around this package:

* :mod:`~llmseg_ros.training.cache` / :mod:`~llmseg_ros.training.precompute` — the sharded,
  resumable proposal cache (COCO RLE masks, scores, boxes, optional DINOv2 features), filled
  by any number of processes (:mod:`~llmseg_ros.training.claims`); the script's run in
  :mod:`~llmseg_ros.training.precompute_run`;
* :mod:`~llmseg_ros.training.config` — :class:`TrainConfig` and :class:`DataSource`;
* :mod:`~llmseg_ros.training.datamix` — datasets mixed by sampling rate, LISA templates;
* :mod:`~llmseg_ros.training.modules` / :mod:`~llmseg_ros.training.trainer` — the trained
  modules, the ``accelerate`` loop, export to the weights directory;
* :mod:`~llmseg_ros.training.checkpoint` — atomic checkpoints with exact resume;
* :mod:`~llmseg_ros.training.oracle` — proposals from synthetic scenes' own instance masks.

Importing this package imports neither ``accelerate`` nor any model.
"""

from llmseg_ros.training.cache import CachedFrame, CacheSet, ProposalCache, image_key
from llmseg_ros.training.config import DataSource, TrainConfig

__all__ = ["CacheSet", "CachedFrame", "DataSource", "ProposalCache", "TrainConfig", "image_key"]
