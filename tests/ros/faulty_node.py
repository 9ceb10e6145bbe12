"""The perception node with injected faults: a test-only executable of the end-to-end tier.

Never installed and not part of the package. It runs the real node (``llmseg_ros.node.main``,
unchanged, in a real ROS 2 process) after swapping two things the node looks up at run
time, the way a test double would:

* the model class: the node builds a :class:`FaultySegmenter`, a subclass of the real
  ``ReasonSegmenter`` with the real models, which misbehaves on request:

  - instruction ``slow <seconds> ...``: the model call prints ``SLOW_MARKER`` and takes
    that many seconds longer; if the models were freed while it waited, it prints
    ``FREED_MARKER`` (a request must never see that);
  - instruction ``fail ...``: the model call raises ``RuntimeError``;
  - instruction ``malformed ...``: the result carries a non-string ``method``, which no
    message field accepts (what a buggy method could return);
  - instruction ``arm close failure ...``: the next ``close()`` (deactivate) raises;
  - environment ``LLMSEG_TEST_LOAD_DELAY``: seconds the first ``load()`` takes longer.

* the frame conversion: a colour frame whose ``frame_id`` is ``poison`` raises an
  unexpected ``RuntimeError`` inside the subscription callback.

    python3 tests/ros/faulty_node.py --ros-args -r __node:=llmseg_faulty -p profile:=tiny
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import llmseg_ros.pipeline as pipeline

FREED_MARKER = "FAULT: models freed during a model call"
SLOW_MARKER = "FAULT: slow model call started"


class FaultySegmenter(pipeline.ReasonSegmenter):
    load_delay_s = float(os.environ.get("LLMSEG_TEST_LOAD_DELAY", "0"))
    close_fails = False

    def load(self) -> None:
        if FaultySegmenter.load_delay_s:
            delay, FaultySegmenter.load_delay_s = FaultySegmenter.load_delay_s, 0.0
            time.sleep(delay)
        super().load()

    def segment(self, frame_or_image: Any, instruction: str, **kwargs: Any) -> Any:
        words = instruction.split()
        if words[:1] == ["slow"]:
            print(SLOW_MARKER, flush=True)
            time.sleep(float(words[1]))
            if not self.is_loaded:
                print(FREED_MARKER, flush=True)
        elif words[:1] == ["fail"]:
            raise RuntimeError("injected model failure")
        elif words[:3] == ["arm", "close", "failure"]:
            FaultySegmenter.close_fails = True
        result = super().segment(frame_or_image, instruction, **kwargs)
        if words[:1] == ["malformed"]:
            result.method = 404
        return result

    def close(self) -> None:
        if FaultySegmenter.close_fails:
            FaultySegmenter.close_fails = False
            raise RuntimeError("injected failure while freeing the models")
        super().close()


def main() -> int:
    import llmseg_ros.node as node_module  # rclpy: only in the node's own process

    convert = node_module.frame_keeping_colour

    def poisoned_frame_keeping_colour(image: Any, depth: Any = None, camera_info: Any = None) -> Any:
        if image.header.frame_id == "poison":
            raise RuntimeError("injected fault in the frame conversion")
        return convert(image, depth, camera_info)

    pipeline.ReasonSegmenter = FaultySegmenter
    node_module.frame_keeping_colour = poisoned_frame_keeping_colour
    return node_module.main()


if __name__ == "__main__":
    sys.exit(main())
