"""Serving benchmark: latency and throughput of POST /v1/generate at 1 and 4 concurrent clients,
and the time from submitting a DreamBooth job to the first image of its expert.

Starts ``suti serve`` on a free loopback port (a separate process, as in production), then drives
it over HTTP. Prints p50/p95 latency and requests/s per concurrency level, the throughput ratio
(4 clients / 1 client) and the job time, all measured in this run; ``--json`` writes them too.

    python benchmarks/serving.py                                # tiny model, untrained apprentice
    python benchmarks/serving.py --model toy --apprentice toy   # the toy world model
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _photos(n: int = 4, size: int = 48) -> list[bytes]:
    import numpy as np
    from PIL import Image, ImageDraw

    out = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(150, 255, 3)))
        draw = ImageDraw.Draw(img)
        cx, cy = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
        draw.ellipse([cx - 10, cy - 10, cx + 10, cy + 10], fill=(220, 30, 30), outline=(250, 220, 0))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _untrained_apprentice(model: str, folder: Path) -> Path:
    from apprentice import ApprenticePipeline
    from suti.models import load_pipeline

    ApprenticePipeline.from_base(load_pipeline(model)).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_clients(url: str, photos: list[bytes], clients: int, requests: int, steps: int) -> dict:
    """``requests`` generations from ``clients`` concurrent clients; 429s are retried after Retry-After."""
    files = [("images", (f"p{i}.png", p, "image/png")) for i, p in enumerate(photos[:3])]

    def one(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        rejected = 0
        while True:
            r = httpx.post(url + "/v1/generate", files=files, data={"prompt": f"a photo {i} on the beach", "steps": steps, "seed": i}, timeout=600)
            if r.status_code != 429:
                r.raise_for_status()
                return time.perf_counter() - started, rejected
            rejected += 1
            time.sleep(float(r.headers.get("retry-after", "1")))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    latencies = [r[0] for r in results]
    return {
        "clients": clients,
        "requests": requests,
        "p50_s": round(_percentile(latencies, 0.5), 3),
        "p95_s": round(_percentile(latencies, 0.95), 3),
        "mean_s": round(statistics.mean(latencies), 3),
        "requests_per_s": round(requests / elapsed, 3),
        "rejected_429": sum(r[1] for r in results),
    }


def time_to_expert_image(url: str, photos: list[bytes], train_steps: int, steps: int) -> dict:
    files = [("images", (f"p{i}.png", p, "image/png")) for i, p in enumerate(photos[:4])]
    started = time.perf_counter()
    r = httpx.post(url + "/v1/experts", files=files, data={"class_noun": "toy", "steps": train_steps}, timeout=60)
    r.raise_for_status()
    job_id = r.json()["id"]
    first_running = None
    while True:
        job = httpx.get(f"{url}/v1/experts/{job_id}", timeout=30).json()
        if job["status"] == "running" and job["progress"] > 0 and first_running is None:
            first_running = time.perf_counter() - started
        if job["status"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if job["status"] != "done":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job['error']}")
    trained = time.perf_counter() - started
    r = httpx.post(f"{url}/v1/experts/{job_id}/generate", data={"prompt": "a {V} {class} on the beach", "steps": steps, "seed": 0}, timeout=600)
    r.raise_for_status()
    total = time.perf_counter() - started
    return {
        "train_steps": train_steps,
        "time_to_training_s": round(first_running or float("nan"), 2),
        "time_to_done_s": round(trained, 2),
        "time_to_first_image_s": round(total, 2),
        "train_seconds_in_worker": job.get("train_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="base model (tiny, toy, ...)")
    parser.add_argument("--apprentice", help="apprentice folder or 'toy' (default: an untrained apprentice on --model)")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--train-steps", type=int, default=50, help="DreamBooth steps of the benchmark job")
    parser.add_argument("--max-concurrency", type=int, default=2, help="the server's --max-concurrency")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="suti-serving-bench-"))
    apprentice = args.apprentice or str(_untrained_apprentice(args.model, work / "apprentice"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "server.log"
    cmd = [
        sys.executable, "-m", "orchestration.cli", "serve", "--model", args.model, "--apprentice", apprentice, "--port", str(port),
        "--data-dir", str(work / "data"), "--max-concurrency", str(args.max_concurrency), "--max-queue", "16",
        "--threads", str(args.threads), "--timeout", "600",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise SystemExit("the server exited:\n" + log_path.read_text()[-3000:])
            try:
                if httpx.get(url + "/healthz", timeout=2).json()["apprentice_loaded"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        startup = time.perf_counter() - started
        photos = _photos()
        run_clients(url, photos, 1, 2, args.steps)  # warm-up
        levels = [run_clients(url, photos, c, args.requests, args.steps) for c in (1, 4)]
        job = time_to_expert_image(url, photos, args.train_steps, args.steps)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    import torch

    results = {
        "model": args.model,
        "apprentice": args.apprentice or "untrained",
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "steps": args.steps,
        "max_concurrency": args.max_concurrency,
        "threads": args.threads,
        "server_startup_s": round(startup, 2),
        "generate": levels,
        "throughput_ratio_4_vs_1": round(levels[1]["requests_per_s"] / levels[0]["requests_per_s"], 2),
        "expert_job": job,
    }
    print(f"model {args.model}, apprentice {results['apprentice']}, {results['device']}, {args.steps} steps/image, server --max-concurrency {args.max_concurrency} --threads {args.threads}")
    print(f"server start-up (apprentice loaded): {startup:.1f} s")
    for level in levels:
        print(f"{level['clients']} client(s): p50 {level['p50_s']:.3f} s, p95 {level['p95_s']:.3f} s, {level['requests_per_s']:.2f} requests/s ({level['requests']} requests, {level['rejected_429']} x 429 retried)")
    print(f"throughput at 4 clients / 1 client: {results['throughput_ratio_4_vs_1']:.2f}x")
    print(f"DreamBooth job ({job['train_steps']} steps): training after {job['time_to_training_s']} s, done after {job['time_to_done_s']} s, first expert image after {job['time_to_first_image_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
