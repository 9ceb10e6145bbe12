"""One process of a precompute job for tests/test_precompute_distributed.py (run by torchrun).

    precompute_worker.py OUT IMAGES_DIR SHARD_SIZE [crash]

Fills the cache OUT from the PNGs of IMAGES_DIR with the deterministic fake stages of
``precompute_testing`` (proposals and features), as one rank of the job the launcher
started. With ``crash``, the job dies in a fixed order of events: rank 0 publishes its
first shard, then blocks inside its next one; rank 1, in the middle of its first shard
(after one image), waits for rank 0's shard to be published and kills itself with
SIGKILL. The launcher then terminates rank 0, mid-shard. Prints the job summary as JSON
on rank 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
from precompute_testing import fake_features, fake_proposals

from llmseg_ros.training.cache import shard_path
from llmseg_ros.training.precompute import precompute_cache
from llmseg_ros.types import Proposals
from llmseg_ros.utils.distributed import launched_world


def main() -> None:
    out, images, shard_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    crash = sys.argv[4:] == ["crash"]
    paths = sorted(images.glob("*.png"))
    with launched_world() as world:
        calls = 0

        def generate(image: np.ndarray) -> Proposals:
            nonlocal calls
            calls += 1
            if crash and world.rank == 0 and calls == shard_size + 1:  # first image of its 2nd shard
                while True:  # until the launcher terminates this process
                    time.sleep(1)
            if crash and world.rank == 1 and calls == 2:  # second image of its first shard
                deadline = time.monotonic() + 60
                while not shard_path(out, 0, ".jsonl").is_file() and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGKILL)
            return fake_proposals(image)

        summary = precompute_cache(
            paths,
            out,
            generate,
            features=fake_features,
            feature_model="fake",
            feature_input_size=28,
            shard_size=shard_size,
            progress=False,
            world=world,
        )
        if world.is_main:
            print(json.dumps(summary.to_dict()))


if __name__ == "__main__":
    main()
