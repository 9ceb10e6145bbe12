"""Memory of ``llmseg import-weights`` (streamed) vs a converter that loads the whole checkpoint.

    python bench/bench_import_memory.py                          # ~0.4 GB checkpoint
    python bench/bench_import_memory.py --layers 24 --shard-mb 256

Builds a LISA release in the authors' Hugging Face layout (``llmseg_ros.tiny.llava_v1``) with
a larger LLaMA, then measures, each in a fresh process:

* ours — ``import_weights`` with ``shard_bytes = --shard-mb``: tensors memory-mapped in,
  written shard by shard;
* reference — what a converter without streaming does: ``torch.load`` of every shard
  (no memory map) into one state dict, written with one ``save_file``.

Memory is the peak of the process's anonymous resident memory (``RssAnon``, sampled every
5 ms above the level after imports): the memory a conversion really needs. Memory-mapped
file pages also show in the total RSS but are clean page cache the kernel drops under
pressure. Prints the checkpoint size, both peaks and their ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, threading, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
from safetensors.torch import save_file
from llmseg_ros.weights.importer import ImportOptions, import_weights

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0

base = anon_kb()
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.005)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
src, clip, out, mode, shard = {args}
if mode == "ours":
    import_weights(ImportOptions("lisa-hf", Path(src), Path(out), vision_tower=Path(clip), shard_bytes=shard), log=lambda s: None)
else:
    index = json.loads((Path(src) / "pytorch_model.bin.index.json").read_text())
    state = {{}}
    for name in sorted(set(index["weight_map"].values())):
        state.update(torch.load(Path(src) / name, weights_only=True, mmap=False))
    Path(out).mkdir()
    save_file({{k: v.contiguous() for k, v in state.items()}}, str(Path(out) / "model.safetensors"))
stop.set(); thread.join()
print(json.dumps({{"peak_mb": (max(peak[0], anon_kb()) - base) / 1024}}))
"""


def measure(source: Path, clip: Path, out: Path, mode: str, shard_bytes: int) -> float:
    code = _CHILD.format(repo=str(REPO), args=(str(source), str(clip), str(out), mode, shard_bytes))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="LLaMA layers of the synthetic checkpoint")
    parser.add_argument("--hidden", type=int, default=1024, help="LLaMA hidden size")
    parser.add_argument("--shard-mb", type=int, default=64, help="our import's shard size (MB)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from llmseg_ros.tiny.llava_v1 import save_clip_vision, save_lisa_hf, save_llava_v1_base
    from llmseg_ros.tiny.sam import save_tiny_sam

    text = {
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 128),
    }
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_llava_v1_base(d / "base")
        save_clip_vision(d / "clip")
        save_tiny_sam(d / "sam.pth")
        save_lisa_hf(d / "lisa", base_dir=d / "base", clip_dir=d / "clip", sam_path=d / "sam.pth", text=text)
        size_mb = sum(p.stat().st_size for p in (d / "lisa").glob("*.bin")) / 2**20
        ours = measure(d / "lisa", d / "clip", d / "ours", "ours", args.shard_mb * 2**20)
        reference = measure(d / "lisa", d / "clip", d / "reference", "reference", args.shard_mb * 2**20)
    print(
        f"checkpoint: {size_mb:.0f} MB ({args.layers} layers, hidden {args.hidden}); shard {args.shard_mb} MB"
    )
    print(f"peak anonymous memory: ours {ours:.0f} MB, load-everything reference {reference:.0f} MB")
    print(f"ours / reference = {ours / reference:.2f}; ours / checkpoint = {ours / size_mb:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
