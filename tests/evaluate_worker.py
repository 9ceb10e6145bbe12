"""One process of an evaluation job for tests/test_evaluate_distributed.py (run by torchrun).

    evaluate_worker.py ARGV_JSON

Joins the job, puts :class:`evaluate_testing.RuleSegmenter` in place of the pipeline, and
runs ``training/evaluate.py``'s ``main`` once per argument list in ARGV_JSON (a JSON list
of lists), all in the same process group; prints ``rank R statuses [...]``.
"""

from __future__ import annotations

import json
import sys

from evaluate_testing import load_evaluate_script, rule_pipeline

from llmseg_ros.utils.distributed import launched_world


def main() -> None:
    script = load_evaluate_script()
    sys.modules["llmseg_ros.pipeline"] = rule_pipeline()
    with launched_world() as world:
        statuses = [script.main(argv) for argv in json.loads(sys.argv[1])]
        print(f"rank {world.rank} statuses {json.dumps(statuses)}", flush=True)


if __name__ == "__main__":
    main()
