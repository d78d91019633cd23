"""Experts/hour of ``suti generate``: resident expert workers vs one task per expert, and scaling
from 1 to 2 resident workers, on the same clusters (one run).

Makes a small synthetic crawl, mines it, then runs ``suti generate`` three times on the same
clusters (fresh outputs): per-task experts with 1 worker, resident workers (``--resident-workers``)
with 1 and with 2 workers, on a local Ray instance. Rates count the expert phase only
(``expert_seconds`` of the job summary: Ray start-up and mining are left out).

    python benchmarks/generation_throughput.py --model toy --clusters 6 --steps 60
On a GPU machine (experts per GPU-hour, 1 GPU per expert):
    python benchmarks/generation_throughput.py --device cuda --model sd15-arch --lora-rank 4 --clusters 4 --steps 100
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from suti.cli import main as suti


def _generate(root: Path, out: str, args, workers: int, extra: list[str]) -> float:
    """Experts per hour of one job (expert phase only)."""
    cmd = ["generate", "--clusters", str(root / "mined" / "clusters.jsonl"), "--crawl", str(root / "crawl"), "--output", str(root / out), "--model", args.model,
           "--steps", str(args.steps), "--max-clusters", str(args.clusters), "--max-workers", str(workers), "--prompts-per-cluster", str(args.prompts),
           "--sample-steps", str(args.sample_steps), "--lambda", "-1", "--gpus-per-expert", "1" if args.device == "cuda" else "0", *extra]
    if args.lora_rank:
        cmd += ["--lora-rank", str(args.lora_rank)]
    code = suti(cmd)
    if code != 0:
        raise SystemExit(code)
    summary = json.loads((root / out / "summary.json").read_text())
    return summary["ran_now"] / summary["expert_seconds"] * 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: 1 GPU per expert, rates are per GPU-hour")
    parser.add_argument("--lora-rank", type=int, help="LoRA experts of this rank (default: the recipe's full fine-tuning)")
    parser.add_argument("--clusters", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prompts", type=int, default=2, help="prompts sampled per expert")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--skip-scaling", action="store_true", help="leave out the 2-worker run (one GPU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        suti(["world", "make", "--output", str(root / "crawl"), "--subjects", str(args.clusters * 2), "--noise-pages", "0.2", "--seed", "3", "--size", "32"])
        suti(["mine", "--crawl", str(root / "crawl"), "--output", str(root / "mined")])
        args.clusters = min(args.clusters, len((root / "mined" / "clusters.jsonl").read_text().splitlines()))
        per_task = _generate(root, "task", args, 1, [])
        resident = _generate(root, "resident1", args, 1, ["--resident-workers"])
        resident2 = None if args.skip_scaling else _generate(root, "resident2", args, 2, ["--resident-workers"])
    unit = "experts per GPU-hour" if args.device == "cuda" else "experts/hour"
    print(f"model={args.model} device={args.device} lora_rank={args.lora_rank} clusters={args.clusters} expert steps={args.steps} prompts={args.prompts} sample steps={args.sample_steps}")
    print(f"  per-task experts, 1 worker:  {per_task:.0f} {unit}")
    print(f"  resident workers, 1 worker:  {resident:.0f} {unit}")
    print(f"resident / per-task: {resident / per_task:.2f}x")
    result = {"model": args.model, "device": args.device, "lora_rank": args.lora_rank, "clusters": args.clusters, "per_task_1": per_task, "resident_1": resident, "resident_vs_per_task": resident / per_task}
    if resident2 is not None:
        per_gpu = resident2 / 2 if args.device == "cuda" else resident2
        print(f"  resident workers, 2 workers: {resident2:.0f} experts/hour" + (f" ({per_gpu:.0f} per GPU-hour)" if args.device == "cuda" else ""))
        print(f"scaling 1 -> 2 workers: {resident2 / resident:.2f}x")
        result.update(resident_2=resident2, scaling_1_to_2=resident2 / resident)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
