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
    p.add_argument("--method", required=True, choices=["expert", "apprentice", "base", "real"],
                   help="what makes the images: expert (a DreamBooth expert per subject), apprentice (no tuning), base (the model, class prompt), "
                        "real (the subject's own photos: the reference row; no sampling flag applies)")
    p.add_argument("--model", help="base model (expert, base; default toy)")
    p.add_argument("--apprentice", help="apprentice folder or toy (apprentice; default toy)")
    p.add_argument("--subjects", help="comma-separated subject names (default: all)")
    p.add_argument("--prompts", type=checks.whole(1, 10_000), help="first n prompt templates, n >= 1 (expert, apprentice, base; default: all of the subject's list, 25 in DreamBench)")
    p.add_argument("--images-per-prompt", type=NUM_IMAGES, help="images per prompt (expert, apprentice, base; default 4)")
    p.add_argument("--output", required=True, help="results folder (rerunning reuses its images when the settings that made them are the same; else it is refused)")
    p.add_argument("--recipe", help="expert recipe (expert; default dreambooth)")
    p.add_argument("--expert-steps", type=checks.whole(1, 10_000_000), help="expert training steps (expert; default: the recipe's)")
    p.add_argument("--num-class-images", type=checks.whole(0, 1_000_000), help="prior-preservation images per expert (expert)")
    p.add_argument("--num-demos", type=checks.whole(1, 8), help="apprentice demonstrations, the first n photos (apprentice; default 3)")
    p.add_argument("--sample-steps", type=STEPS, help="sampling steps (expert, apprentice, base; default 25)")
    p.add_argument("--guidance-scale", type=GUIDANCE_SCALE, help="classifier-free guidance (expert, apprentice, base; default 5.0); on a FLUX base (or apprentice) the distilled guidance (default 3.5)")
    p.add_argument("--seed", type=SEED, default=0)
    add_sampler_flags(p)
    p.add_argument("--clip", default="auto", help="CLIP backbone: auto (openai ViT-B/32, else the world's toy-clip), or a scorer name")
    p.add_argument("--dino", default="auto", help="DINO backbone: auto (dino-vits16, else toy-identity), or a scorer name")
    p.set_defaults(func=_run, local_paths=("output", "dataset", "apprentice"))


_SAMPLING = ("expert", "apprentice", "base")
#: Flags that only some methods read: (attribute, flag, those methods, the default). Given to
#: another method they are refused (they would be ignored); left out, the default is filled for
#: every method (the results folder's key holds them).
METHOD_FLAGS = (("prompts", "--prompts", _SAMPLING, None), ("images_per_prompt", "--images-per-prompt", _SAMPLING, 4),
                ("sample_steps", "--sample-steps", _SAMPLING, 25), ("guidance_scale", "--guidance-scale", _SAMPLING, None), ("dtype", "--dtype", _SAMPLING, None),
                ("model", "--model", ("expert", "base"), "toy"), ("apprentice", "--apprentice", ("apprentice",), "toy"),
                ("recipe", "--recipe", ("expert",), "dreambooth"), ("expert_steps", "--expert-steps", ("expert",), None),
                ("num_class_images", "--num-class-images", ("expert",), None), ("num_demos", "--num-demos", ("apprentice",), 3))


def method_flags(args) -> None:
    """Refuse a flag that ``--method`` does not read (:data:`METHOD_FLAGS`), then fill the
    defaults of those left out.

    Raises:
        InputError: e.g. ``--model`` with ``--method apprentice`` (the apprentice folder carries
            its base) or ``--num-demos`` with ``--method expert``.
    """
    from suti.errors import InputError

    for attr, flag, methods, default in METHOD_FLAGS:
        value = getattr(args, attr, None)
        if value is not None and args.method not in methods:
            hint = "; the apprentice folder carries its base" if attr == "model" and args.method == "apprentice" else ""
            raise InputError(f"{flag} {value}: --method {args.method} does not read it (only --method {' or '.join(methods)}){hint}")
        if value is None:
            setattr(args, attr, default)


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

    method_flags(args)
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
