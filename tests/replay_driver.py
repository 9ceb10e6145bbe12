"""Runs ``llmseg replay-bag`` in a child process with a model stand-in that computes in native code.

Used by the signal and kill tests of ``test_replay_failures.py``. The stand-in answers as
:class:`ros_testing.FakeSegmenter` does, after torch work on the request worker thread (as
a real model does), and touches ``MARKER`` whenever a frame reaches it. ``--busy`` makes
that work last until the process ends.

    python replay_driver.py MARKER [--busy] -- <llmseg replay-bag arguments>
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from ros_testing import FakeSegmenter

import llmseg_ros.cli.common as cli_common
import llmseg_ros.pipeline as pipeline
from llmseg_ros.cli import main


class NativeWorkSegmenter(FakeSegmenter):
    """:class:`FakeSegmenter` behind matrix products (the GIL is released inside each)."""

    marker: Path
    busy = False

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"device": "cpu"}

    def segment(self, frame_or_image: Any, instruction: str, **kwargs: Any) -> Any:
        self.marker.touch()
        a = torch.rand(256, 256)
        for _ in range(10**9 if self.busy else 20):
            a = a @ a
            a = a / a.norm()
        return super().segment(frame_or_image, instruction, **kwargs)


def run(argv: list[str]) -> int:
    split = argv.index("--")
    options, rest = argv[:split], argv[split + 1 :]
    NativeWorkSegmenter.marker = Path(options[0])
    NativeWorkSegmenter.busy = "--busy" in options
    cli_common.report_missing_inputs = lambda config, command: False  # type: ignore[assignment]
    pipeline.ReasonSegmenter = lambda config: NativeWorkSegmenter(config=config)  # type: ignore[assignment,misc]
    return main(["replay-bag", *rest])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
