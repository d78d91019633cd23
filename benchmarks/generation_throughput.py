"""Experts/hour of the generation job with 1 and 2 workers, and the scaling ratio (one run).

Makes a small synthetic crawl, mines it, then runs ``suti generate`` twice on the same clusters
(fresh outputs) with ``--max-workers 1`` and ``2`` on a local Ray instance.

    python benchmarks/generation_throughput.py --model toy --clusters 6 --steps 60
On a GPU machine, compare one full expert per GPU with several LoRA experts packed on one GPU:
    python benchmarks/generation_throughput.py --model sd15-arch --gpu-packing
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from suti.cli import main as suti


def _generate(root: Path, out: str, model: str, steps: int, clusters: int, workers: int, extra: list[str]) -> float:
    started = time.perf_counter()
    code = suti(["generate", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(root / out), "--model", model, "--steps", str(steps), "--max-clusters", str(clusters), "--max-workers", str(workers), "--prompts-per-cluster", "2", *extra])
    if code != 0:
        raise SystemExit(code)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--clusters", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gpu-packing", action="store_true", help="GPU: 1 full expert per GPU vs 4 LoRA experts on one GPU")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        suti(["world", "make", "--output", str(root / "crawl"), "--subjects", str(args.clusters * 2), "--noise-pages", "0.2", "--seed", "3", "--size", "32"])
        suti(["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")])
        n = min(args.clusters, len((root / "mined" / "clusters.jsonl").read_text().splitlines()))
        if args.gpu_packing:
            a = _generate(root, "full", args.model, args.steps, n, 1, ["--gpus-per-expert", "1"])
            b = _generate(root, "lora", args.model, args.steps, n, 4, ["--gpus-per-expert", "0.25", "--lora-rank", "4"])
            labels = ("full, 1 per GPU", "LoRA, 4 per GPU")
        else:
            a = _generate(root, "w1", args.model, args.steps, n, 1, [])
            b = _generate(root, "w2", args.model, args.steps, n, 2, [])
            labels = ("1 worker", "2 workers")
    rate_a, rate_b = n / a * 3600, n / b * 3600
    print(f"model={args.model} clusters={n} expert steps={args.steps}")
    print(f"  {labels[0]}: {a:.1f} s = {rate_a:.0f} experts/hour")
    print(f"  {labels[1]}: {b:.1f} s = {rate_b:.0f} experts/hour")
    print(f"scaling ratio ({labels[1]} / {labels[0]}): {rate_b / rate_a:.2f}")
    print(json.dumps({"model": args.model, "clusters": n, labels[0]: rate_a, labels[1]: rate_b, "ratio": rate_b / rate_a}))


if __name__ == "__main__":
    main()
