"""``suti eval``: the DreamBench protocol for any suti method."""

from __future__ import annotations

import json
from pathlib import Path

from suti import checks
from suti.cli_format import HelpFormatter
from suti.sampling import GUIDANCE_SCALE, NUM_IMAGES, SEED, STEPS


def register(subparsers) -> None:
    """Add ``suti eval``."""
    from suti.sampling import add_sampler_flags

    p = subparsers.add_parser("eval", help="DreamBench evaluation (DINO, CLIP-I, CLIP-T, PRES, DIV) of a method", formatter_class=HelpFormatter)
    p.add_argument("--dataset", required=True, help='DreamBench-layout folder, or "world:N" for N held-out subjects of the synthetic world')
    p.add_argument("--method", required=True, choices=["expert", "apprentice", "base", "real"])
    p.add_argument("--model", default="toy", help="base model (expert, base)")
    p.add_argument("--apprentice", default="toy", help="apprentice folder or toy (apprentice)")
    p.add_argument("--subjects", help="comma-separated subject names (default: all)")
    p.add_argument("--prompts", type=checks.whole(1, 10_000), help="first n prompt templates, n >= 1 (default: all of the subject's list, 25 in DreamBench)")
    p.add_argument("--images-per-prompt", type=NUM_IMAGES, default=4)
    p.add_argument("--output", required=True, help="results folder (rerunning reuses its images when the settings that made them are the same; else it is refused)")
    p.add_argument("--recipe", default="dreambooth", help="expert recipe")
    p.add_argument("--expert-steps", type=checks.whole(1, 10_000_000), help="expert training steps (default: the recipe's)")
    p.add_argument("--num-class-images", type=checks.whole(0, 1_000_000), help="prior-preservation images per expert")
    p.add_argument("--num-demos", type=checks.whole(1, 8), default=3, help="apprentice demonstrations (the first n photos)")
    p.add_argument("--sample-steps", type=STEPS, default=25)
    p.add_argument("--guidance-scale", type=GUIDANCE_SCALE, help="classifier-free guidance (default 5.0); on a FLUX base (or apprentice) the distilled guidance (default 3.5)")
    p.add_argument("--seed", type=SEED, default=0)
    add_sampler_flags(p)
    p.add_argument("--clip", default="auto", help="CLIP backbone: auto (openai ViT-B/32, else the world's toy-clip), or a scorer name")
    p.add_argument("--dino", default="auto", help="DINO backbone: auto (dino-vits16, else toy-identity), or a scorer name")
    p.set_defaults(func=_run, local_paths=("output", "dataset", "apprentice"))


def default_guidance(args) -> float:
    """``--guidance-scale``'s default: 3.5 (the distilled guidance) when the images come from a
    FLUX base or a FLUX apprentice, else 5.0 (classifier-free guidance)."""
    from suti.models import model_family

    if args.method == "apprentice" and args.apprentice != "toy":
        from apprentice.sample import apprentice_class

        flux = apprentice_class(Path(args.apprentice)).__name__ == "FluxApprenticePipeline"
    else:
        flux = args.method in ("base", "expert") and model_family(args.model).name == "flux"
    return 3.5 if flux else 5.0


def _run(args) -> int:
    from orchestration.eval.run import check_args, check_reuse, json_safe, run_eval

    if args.guidance_scale is None:
        args.guidance_scale = default_guidance(args)
    check_args(args)  # before the world dataset is written
    if args.dataset.startswith("world"):
        from orchestration.eval.worldbench import world_dataset

        args.dataset_spec = args.dataset
        check_reuse(args, None)  # a results folder of other settings is refused before its dataset is touched
        args.dataset = str(world_dataset(args.dataset, Path(args.output) / "dataset", seed=args.seed))
    overall = run_eval(args)
    print(json.dumps(json_safe(overall), allow_nan=False))
    return 0
