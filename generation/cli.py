"""``suti generate``: the distributed expert generation job (see :mod:`generation.job`)."""

from __future__ import annotations

import json
import sys

from suti.cli_format import HelpFormatter


def register(subparsers) -> None:
    """Add ``suti generate``."""
    from experts.recipe import expert_number
    from generation.config import KEEP_EXPERTS_FORMATS, generate_number
    from suti.sampling import add_sample_batch_flag

    p = subparsers.add_parser("generate", help="fine-tune one expert per mined cluster on Ray and write webdataset shards", formatter_class=HelpFormatter)
    p.add_argument("--clusters", help="clusters.jsonl written by `suti mine` (a local path or a storage URI: s3://, gs://, file://); required to run a job")
    p.add_argument("--crawl", help="the crawl the clusters were mined from (local path or URI; only the driver reads it); required to run a job")
    p.add_argument("--output", help="folder or object-store prefix for the shards, manifest and staging (local path or URI); required to run a job")
    p.add_argument("--status", metavar="OUTPUT", help="print how far the job writing to OUTPUT has come (clusters finished and to go, failures, samples, experts/hour, ETA) "
                   "and exit: read-only, no Ray, from any machine that can read OUTPUT (no other flag needed)")
    p.add_argument("--json", action="store_true", help="with --status: print it as JSON")
    p.add_argument("--progress-plot", metavar="PNG", help="with --status: also draw samples kept and experts/hour over time into PNG (a local path or URI ending in .png; replaced if it exists)")
    p.add_argument("--job-name", help="the 'job' tag of the driver's Ray metrics (suti_generate_*; default: the output's last path component)")
    p.add_argument("--model", default="toy", help="base model of the experts: a preset (tiny, toy, tiny-sdxl, tiny-flux, sd15-arch, sdxl-arch, flux-arch), a diffusers folder or a hub id")
    p.add_argument("--recipe", default="suti-expert", help="expert recipe (configs/recipes)")
    p.add_argument("--steps", type=generate_number("steps"), help="expert steps (overrides the recipe)")
    p.add_argument("--lora-rank", type=expert_number("lora_rank"), help="train LoRA experts of this rank (0: full fine-tuning)")
    p.add_argument("--lambda", dest="lambda_", type=generate_number("lambda_"), default=0.02, help="keep samples with delta-CLIP > lambda, in [-2, 2]")
    p.add_argument("--no-filter", action="store_true", help="keep every sample (the lambda=none ablation)")
    p.add_argument("--samples-per-prompt", type=generate_number("samples_per_prompt"), default=1, help="candidate images per prompt")
    p.add_argument("--prompts-per-cluster", type=generate_number("prompts_per_cluster_or_all"), default=4, help="unseen prompts sampled per cluster (0: all)")
    p.add_argument("--sample-steps", type=generate_number("sample_steps"), default=25, help="denoising steps per sample")
    p.add_argument("--guidance-scale", type=generate_number("guidance_scale"), help="the experts' sampling guidance (default: 7.5 classifier-free for SD/SDXL, the distilled 3.5 for FLUX; the paper: 30 for Imagen experts)")
    add_sample_batch_flag(p, "candidate images")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="sampling dtype of the experts (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--scorer", help="CLIP used for delta-CLIP (default: the model's own: toy-clip for the world presets tiny/toy, openai-clip-vit-b-32 otherwise)")
    p.add_argument("--samples-per-shard", type=generate_number("samples_per_shard"), default=64, help="samples per webdataset shard")
    p.add_argument("--max-clusters", type=generate_number("max_clusters"), help="only the first n clusters")
    p.add_argument("--keep-experts", action="store_true", help="keep expert weights under OUTPUT/experts/")
    p.add_argument("--keep-experts-format", choices=KEEP_EXPERTS_FORMATS, default="diffusers", help="layout of kept LoRA experts: diffusers (pytorch_lora_weights.safetensors), "
                   "or kohya: also pytorch_lora_weights_kohya.safetensors (kohya's layout, for ComfyUI/A1111; needs --lora-rank > 0)")
    p.add_argument("--seed", type=generate_number("seed"), default=0, help="the job's seed (each cluster's is derived from it)")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--gpus-per-expert", type=generate_number("gpus_per_expert"), help="GPUs per expert task (default: 1 on a Ray cluster with GPUs, else 0; fractions such as 0.25 pack LoRA experts)")
    p.add_argument("--cpus-per-expert", type=generate_number("cpus_per_expert"), default=1.0, help="CPUs per expert task (> 0; fractions allowed)")
    p.add_argument("--max-workers", type=generate_number("max_workers"), help="experts in flight at once (default: as resources allow)")
    p.add_argument("--max-retries", type=generate_number("max_retries"), default=2, help="retries of a cluster whose worker died or hit a transient error")
    p.add_argument("--retry-failed", action="store_true", help="run clusters recorded as failed again")
    p.add_argument("--resident-workers", action="store_true", help="resident expert workers: one Ray actor per GPU (or CPU) slot loads the base model and scorer once and trains experts back to back, sampling from memory")
    p.add_argument("--expert-batch-size", type=generate_number("expert_batch_size"), default=None, help="with --resident-workers and LoRA experts: each worker trains this many experts together, one U-Net pass per step "
                   "(default: as many as fit the GPU's free memory, measured by the worker; 1 on CPUs) "
                   "(stacked LoRA layers: one batched matmul per layer whatever the size); their samples equal one-at-a-time experts' up to float rounding, not byte for byte")
    p.add_argument("--compile", action="store_true", help="with --expert-batch-size: train through torch.compile of the U-Net with its stacked LoRA layers (measure it: benchmarks/generation_throughput.py)")
    p.set_defaults(func=lambda args: _run(args, p))


def _run(args, parser) -> int:
    if args.status is not None:
        return _status(args.status, as_json=args.json, progress_plot=args.progress_plot)
    if args.json:
        parser.error("--json goes with --status OUTPUT")
    if args.progress_plot is not None:
        parser.error("--progress-plot goes with --status OUTPUT")
    missing = [flag for flag in ("--clusters", "--crawl", "--output") if getattr(args, flag[2:]) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --status OUTPUT)")
    from generation.job import GenerateConfig, run_generation

    from suti.models import model_family

    guidance = args.guidance_scale if args.guidance_scale is not None else model_family(args.model).training_defaults.get("guidance_scale", 7.5)
    overrides = {}
    if args.lora_rank is not None:
        overrides["lora_rank"] = args.lora_rank
    config = GenerateConfig(
        clusters=args.clusters, crawl=args.crawl, output=args.output, model=args.model, recipe=args.recipe,
        steps=args.steps, recipe_overrides=overrides, lambda_=args.lambda_, samples_per_prompt=args.samples_per_prompt,
        prompts_per_cluster=args.prompts_per_cluster or None, sample_steps=args.sample_steps, guidance_scale=guidance, sample_batch_size=args.sample_batch_size,
        scorer=args.scorer, samples_per_shard=args.samples_per_shard, max_clusters=args.max_clusters,
        keep_experts=args.keep_experts, keep_experts_format=args.keep_experts_format, no_filter=args.no_filter, seed=args.seed, ray_address=args.ray_address,
        gpus_per_expert=args.gpus_per_expert, cpus_per_expert=args.cpus_per_expert, max_workers=args.max_workers,
        max_retries=args.max_retries, retry_failed=args.retry_failed, resident_workers=args.resident_workers, expert_batch_size=args.expert_batch_size, compile=args.compile, dtype=args.dtype,
        job_name=args.job_name,
    )
    summary = run_generation(config)
    print(json.dumps(summary))
    if summary["failed"] and not summary["accepted"] and not summary["rejected"]:
        from generation.job import read_manifest
        from suti import storage

        first = next((row.get("error") for row in read_manifest(storage.resolve(args.output)).values() if row.get("status") == "failed"), "")
        print(f"suti: error: every cluster failed (first: {first}); see {args.output}/manifest/ (rerun with --retry-failed)", file=sys.stderr)
        return 1
    if summary["failed"]:
        print(f"warning: {summary['failed']} cluster(s) failed; see {args.output}/manifest/ (rerun with --retry-failed)")
    return 1 if summary.get("unfinished") else 0


def _status(output: str, as_json: bool = False, progress_plot: str | None = None) -> int:
    """``suti generate --status OUTPUT [--json] [--progress-plot PNG]``: print the job's status
    (:mod:`generation.status`) and draw the plot (:mod:`generation.progress_plot`; its path is
    checked before the job is read, and the manifest is read once); exit code 0."""
    from generation.status import format_status, job_status_and_rows

    if progress_plot is not None:
        from generation.progress_plot import check_plot_path

        progress_plot = check_plot_path(progress_plot)
    status, rows, times = job_status_and_rows(output)
    print(json.dumps(status.to_dict(), indent=2) if as_json else format_status(status))
    if progress_plot is not None:
        from generation.progress_plot import write_progress_plot

        write_progress_plot(progress_plot, status, rows, times)
        print(f"progress plot: {progress_plot}", file=sys.stderr if as_json else sys.stdout)
    return 0
