"""LoRA parity: suti's expert trainer vs diffusers' own DreamBooth LoRA script of the same family.

Both trainers run as their users run them, each as a subprocess of the project's Python: the peer
script unmodified (``--peer-script PATH``; it is never copied into this repository) and
``suti expert train``, on the same diffusers folder (``--model``: a suti preset, whose cached
folder both load, ``SUTI_CACHE`` sets the cache root; ``tiny`` is SD1, ``tiny-flux`` FLUX), the same
photos, instance prompt, rank, rate, steps and seed. The peer is the family's script of
diffusers' ``examples/dreambooth``: ``train_dreambooth_lora.py`` for SD1/SD2 (``--family sd``),
``train_dreambooth_lora_flux.py`` for FLUX (``--family flux``); the family is read from the
model. Each trained LoRA file is then loaded into the same base pipeline and scored by
:func:`experts.evaluate.denoising_loss` (the training objective's loss on the instance photos with
the instance prompt, at fixed noise and timesteps, one eval seed for all). Paired by seed
(``--seed S`` on both sides), it prints each seed's suti - peer difference, their mean, standard
error and sign count: one run, one result (``--output`` writes the rows as JSON). It also checks
that each side loads the other's file: suti's in plain diffusers
(``DiffusionPipeline.from_pretrained(folder).load_lora_weights``) and the peer's through
``suti expert import`` + :func:`experts.expert.load_expert`, with the same denoiser output as
plain diffusers loading it.

Getting the peer (diffusers' examples are not in the wheel): a diffusers checkout, or this
project's ``fetch`` of ``github:huggingface/diffusers``, then e.g.
``git -C DIFFUSERS_GIT show HEAD:examples/dreambooth/train_dreambooth_lora.py > /tmp/peer.py``.
Measured with diffusers commit 58eb52c (the installed diffusers 0.42.1 runs it on the CPU with
plain ``python``, no ``accelerate launch``).

    python benchmarks/lora_parity.py --model tiny --peer-script /tmp/peer_sd.py --seeds 12 --steps 150 --output rows.json
    python benchmarks/lora_parity.py --model tiny-flux --peer-script /tmp/peer_flux.py --seeds 6 --steps 150 --output rows.json

Settings passed to both sides (each is a peer default that differs from suti's, or the reverse):

- learning rate: the peer's ``--learning_rate`` = suti's ``--learning-rate`` with
  ``--learning-rate-scale 1`` (tiny presets multiply suti's rate by their ``learning_rate_scale``).
- ``--lr_warmup_steps 0`` (peer default 500) = ``--lr-warmup-steps 0``; constant schedule both.
- weight decay: the peer's default on both sides (SD: 1e-2, suti's default too; FLUX: 1e-4,
  suti's default 1e-2); betas 0.9/0.999, epsilon 1e-8 and ``--max_grad_norm 1.0`` given to both;
  AdamW (the SD script has no other optimizer).
- ``--train_batch_size 1`` (peer default 4) = ``--batch-size 1``; gradient accumulation 1.
- ``--resolution`` (peer default 512) = ``--resolution``; ``--center_crop`` (peer default random
  crop) = ``--center-crop``; no flip on either side.
- resize filter: SD: ``--image_interpolation_mode lanczos`` (both defaults); the FLUX script
  hard-codes bilinear (``transforms.Resize(..., BILINEAR)``; it has no
  ``--image_interpolation_mode``) = ``--image-interpolation-mode bilinear`` (suti's default lanczos).
- FLUX only: ``--max_sequence_length`` (both default 512) given to both; ``--guidance_scale 3.5``
  (suti's FLUX training default); ``--weighting_scheme none`` both.
- rank 4, alpha = rank (the SD script hard-codes ``lora_alpha=rank``; the FLUX script's
  ``--lora_alpha`` is given), no LoRA dropout, Gaussian init (both); the same target modules (the
  files hold the same keys).
- no prior preservation (``--no-prior-preservation``; suti's ``dreambooth-lora`` recipe has it on),
  text encoders frozen, ``--mixed_precision no`` / ``--mixed-precision no`` (full fp32 on the CPU).
- the instance prompt: the peer's ``--instance_prompt "a photo of sks dog"`` = suti's
  ``--identifier sks --class-noun dog --instance-prompt "a photo of {V} {class}"``.

What stays different by design: the peer shuffles its photos once per epoch (a ``DataLoader``,
``shuffle=True``) and encodes them with the VAE at every step; suti draws each step's photos
uniformly with replacement and draws from cached VAE posteriors (the same distribution); the two
consume different random streams, so one seed gives different draws on the two sides and the
comparison is statistical (paired by seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH = ROOT.parent / "shared" / "dreambench"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _image_files(folder: Path) -> list[Path]:
    """The files of ``folder`` with an image suffix (:data:`IMAGE_SUFFIXES`), sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
LORA_FILE = "pytorch_lora_weights.safetensors"
IDENTIFIER, CLASS_NOUN, PROMPT_TEMPLATE = "sks", "dog", "a photo of {V} {class}"


def instance_prompt(identifier: str = IDENTIFIER, class_noun: str = CLASS_NOUN) -> str:
    """The prompt both trainers see: the template filled as suti fills it."""
    return PROMPT_TEMPLATE.replace("{V}", identifier).replace("{class}", class_noun)


#: Per family: the peer's script (diffusers ``examples/dreambooth``), its default weight decay
#: (given to both sides) and the resize filter both sides use.
FAMILIES = {"sd": {"script": "train_dreambooth_lora.py", "weight_decay": 1e-2, "interpolation": "lanczos"},
            "flux": {"script": "train_dreambooth_lora_flux.py", "weight_decay": 1e-4, "interpolation": "bilinear"}}


def peer_command(script: Path, folder: str, photos: Path, output: Path, seed: int, args) -> list[str]:
    """The peer's command line: every setting that matters given explicitly (see the docstring).
    ``args.family`` is ``sd`` or ``flux`` (:data:`FAMILIES`)."""
    fam = FAMILIES[args.family]
    cmd = [sys.executable, str(script), "--pretrained_model_name_or_path", folder, "--instance_data_dir", str(photos),
           "--instance_prompt", instance_prompt(), "--output_dir", str(output), "--seed", str(seed),
           "--resolution", str(args.resolution), "--center_crop", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
           "--max_train_steps", str(args.steps), "--learning_rate", repr(args.learning_rate), "--lr_scheduler", "constant",
           "--lr_warmup_steps", "0", "--rank", str(args.rank), "--lora_dropout", "0",
           "--adam_beta1", "0.9", "--adam_beta2", "0.999", "--adam_epsilon", "1e-8",
           "--adam_weight_decay", repr(fam["weight_decay"]), "--max_grad_norm", "1.0", "--mixed_precision", "no",
           "--checkpointing_steps", str(10 * args.steps + 1), "--report_to", "tensorboard"]
    if args.family == "flux":  # the SD script hard-codes lora_alpha = rank and AdamW; FLUX's resize is bilinear, hard-coded
        return cmd + ["--lora_alpha", str(args.rank), "--guidance_scale", "3.5", "--max_sequence_length", str(args.max_sequence_length),
                      "--weighting_scheme", "none", "--optimizer", "AdamW"]
    return cmd + ["--image_interpolation_mode", fam["interpolation"]]


def peer_flags_missing(script: Path, args) -> list[str]:
    """The options :func:`peer_command` passes that ``script`` does not define (read as text:
    each must appear as a quoted ``"--name"``): a script of another family, before any work."""
    import re

    text = script.read_text(errors="replace")
    wanted = [a for a in peer_command(script, "F", Path("p"), Path("o"), 0, args) if a.startswith("--")]
    return [flag for flag in wanted if not re.search(rf"[\"']{re.escape(flag)}[\"']", text)]


def suti_command(model: str, photos: Path, output: Path, seed: int, args) -> list[str]:
    """``suti expert train`` with the same settings as :func:`peer_command`."""
    fam = FAMILIES[args.family]
    cmd = [sys.executable, "-m", "orchestration.cli", "expert", "train", "--model", model, "--recipe", "dreambooth-lora",
           "--instance-dir", str(photos), "--class-noun", CLASS_NOUN, "--identifier", IDENTIFIER, "--instance-prompt", PROMPT_TEMPLATE,
           "--output", str(output), "--seed", str(seed), "--resolution", str(args.resolution), "--center-crop",
           "--image-interpolation-mode", fam["interpolation"], "--batch-size", "1", "--gradient-accumulation-steps", "1",
           "--steps", str(args.steps), "--learning-rate", repr(args.learning_rate), "--learning-rate-scale", "1",
           "--lr-scheduler", "constant", "--lr-warmup-steps", "0", "--lora-rank", str(args.rank), "--lora-alpha", str(args.rank),
           "--lora-dropout", "0", "--no-prior-preservation", "--no-train-text-encoder", "--optimizer", "adamw",
           "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-epsilon", "1e-8", "--adam-weight-decay", repr(fam["weight_decay"]),
           "--max-grad-norm", "1.0", "--mixed-precision", "no", "--report-to", "none", "--overwrite"]
    if args.family == "flux":
        cmd += ["--max-sequence-length", str(args.max_sequence_length), "--weighting-scheme", "none"]
    return cmd


def paired_summary(diffs: list[float]) -> dict:
    """Mean, standard error (sample standard deviation / sqrt(n); NaN for one seed) and sign count
    of per-seed differences (suti - peer)."""
    mean = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return {"mean_difference": mean, "standard_error": se, "suti_lower": sum(d < 0 for d in diffs), "seeds": len(diffs),
            "within_2se": bool(abs(mean) <= 2 * se) if len(diffs) > 1 else None}


def _run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run ``cmd`` (output to ``log``); its wall seconds. Raises SystemExit with the log's tail on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd[:4])} ...\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def _photos(args, work: Path) -> tuple[Path, str]:
    """The instance photos copied into ``work/photos`` (image files only: the peer opens every
    file of its folder) and where they came from."""
    photos = work / "photos"
    photos.mkdir()
    source = Path(args.photos) if args.photos else DREAMBENCH / "dog"
    if source.is_dir():
        files = _image_files(source)[: args.max_photos]
        for p in files:
            shutil.copyfile(p, photos / p.name)
        return photos, str(source)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import draw_subject

    for i in range(args.max_photos):
        draw_subject(i).save(photos / f"p{i}.png")
    return photos, "synthetic (tests/conftest.py draw_subject)"


def _with_lora(pipe, lora: Path | None):
    """``pipe`` with ``lora`` loaded as the adapter ``parity`` (none: the base), denoiser in eval mode."""
    from suti.denoisers import denoiser_module

    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="parity")
    denoiser_module(pipe).eval()
    return pipe


def eval_loss(pipe, lora: Path | None, images, args) -> float:
    """:func:`experts.evaluate.denoising_loss` of the base with ``lora`` loaded, then unloaded."""
    from experts.evaluate import denoising_loss

    _with_lora(pipe, lora)
    try:
        return denoising_loss(pipe, images, instance_prompt(), seed=args.eval_seed, draws=args.draws)
    finally:
        if lora is not None:
            pipe.unload_lora_weights()


def denoiser_output(pipe, max_sequence_length: int, resolution: int):
    """The denoiser's prediction (U-Net noise or FLUX velocity) on fixed latents (seed 0),
    timestep 500 and the instance prompt."""
    import torch

    from suti.conditioning import encode_prompt
    from suti.denoisers import denoiser_for

    size = resolution // pipe.vae_scale_factor
    latents = torch.randn((1, pipe.vae.config.latent_channels, size, size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = encode_prompt(pipe, [instance_prompt()], max_sequence_length=max_sequence_length)
        return denoiser_for(pipe)(latents, torch.tensor([500.0]), cond)


def cross_load(model: str, folder: str, suti_expert: Path, peer_lora: Path, work: Path, args) -> dict:
    """Each side loads the other's file. suti's file: plain diffusers ``DiffusionPipeline`` +
    ``load_lora_weights`` vs :func:`experts.expert.load_expert`; the peer's: ``suti expert import``
    then ``load_expert`` vs plain diffusers. Max absolute differences of the denoiser output,
    and how far each LoRA moves it from the base (so a no-op load cannot pass)."""
    from diffusers import DiffusionPipeline

    from experts.expert import load_expert

    def out(pipe):
        return denoiser_output(pipe, args.max_sequence_length, args.resolution)

    base = out(_with_lora(DiffusionPipeline.from_pretrained(folder), None))
    suti_plain = out(_with_lora(DiffusionPipeline.from_pretrained(folder), suti_expert / LORA_FILE))
    suti_own = out(_with_lora(load_expert(suti_expert), None))
    imported = work / "peer-imported"
    _run([sys.executable, "-m", "orchestration.cli", "expert", "import", "--lora", str(peer_lora), "--model", model, "--identifier", IDENTIFIER,
          "--class-noun", CLASS_NOUN, "--instance-prompt", PROMPT_TEMPLATE, "--output", str(imported)], ROOT, work / "import.log")
    peer_plain = out(_with_lora(DiffusionPipeline.from_pretrained(folder), peer_lora))
    peer_suti = out(_with_lora(load_expert(imported), None))
    info = json.loads((imported / "expert.json").read_text())
    return {"suti_file_in_diffusers_max_abs_diff": (suti_plain - suti_own).abs().max().item(),
            "suti_lora_change_from_base": (suti_own - base).abs().max().item(),
            "peer_file_through_suti_import_max_abs_diff": (peer_suti - peer_plain).abs().max().item(),
            "peer_lora_change_from_base": (peer_plain - base).abs().max().item(),
            "imported_guidance_scale": (info.get("config") or {}).get("guidance_scale"),
            "keys_suti": _lora_keys(suti_expert / LORA_FILE), "keys_peer": _lora_keys(peer_lora),
            "same_keys": _lora_keys(suti_expert / LORA_FILE, names=True) == _lora_keys(peer_lora, names=True)}


def _lora_keys(path: Path, names: bool = False):
    """The tensor names of a LoRA safetensors file (``names``) or their count."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = sorted(f.keys())
    return keys if names else len(keys)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peer-script", required=True, help="the family's diffusers examples/dreambooth script, unmodified: "
                   "train_dreambooth_lora.py (SD1/SD2) or train_dreambooth_lora_flux.py (FLUX)")
    p.add_argument("--model", default="tiny", help="a suti SD1/SD2 or FLUX preset (default tiny, SD1); the family picks the peer's settings")
    p.add_argument("--photos", help="instance photos folder (default ../shared/dreambench/dog when present, else 4 synthetic photos)")
    p.add_argument("--max-photos", type=int, default=4)
    p.add_argument("--seeds", type=int, default=6, help="paired seeds 0..N-1 (each trainer's --seed)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--learning-rate", type=float, default=1e-3, help="the effective rate on both sides")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank, as the peer's default)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--max-sequence-length", type=int, default=77)
    p.add_argument("--draws", type=int, default=16, help="noise draws per photo in the eval loss")
    p.add_argument("--eval-seed", type=int, default=10_000)
    p.add_argument("--output", help="write the rows and the summary as JSON here")
    p.add_argument("--work-dir", help="keep the trained files here (default: a temporary folder)")
    args = p.parse_args(argv)
    for name, low in (("max_photos", 1), ("seeds", 1), ("steps", 1), ("rank", 1), ("resolution", 16), ("max_sequence_length", 1), ("draws", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    from suti.models import list_presets, model_family

    if args.model not in list_presets():
        p.error(f"--model {args.model}: not a suti preset (one of {', '.join(list_presets())}); both trainers load its cached folder")
    family = model_family(args.model).name
    args.family = family if family in FAMILIES else None
    if args.family is None:
        p.error(f"--model {args.model}: family {family!r} has no peer here (sd: train_dreambooth_lora.py, flux: train_dreambooth_lora_flux.py)")
    if args.family == "flux" and args.resolution % 16:
        p.error(f"--resolution {args.resolution}: must be a multiple of 16 (FLUX packs 2x2 latent patches of an 8x VAE)")
    missing = peer_flags_missing(Path(args.peer_script), args)
    if missing:
        p.error(f"--peer-script {args.peer_script}: takes no {', '.join(missing)}; --model {args.model} needs diffusers' {FAMILIES[args.family]['script']}")
    if not 0 < args.learning_rate < 1:
        p.error(f"--learning-rate {args.learning_rate}: must be in (0, 1)")
    if not Path(args.peer_script).is_file():
        p.error(f"--peer-script {args.peer_script}: no such file (see the docstring: how to get it)")
    if args.photos and not Path(args.photos).is_dir():
        p.error(f"--photos {args.photos}: no such folder")
    if args.photos and not _image_files(args.photos):
        p.error(f"--photos {args.photos}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from experts.latents import load_training_pixels
    from suti.images import list_image_files
    from suti.models import load_pipeline, preset_folder

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    folder = str(preset_folder(args.model))
    script = Path(args.peer_script).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        kept = work / "photos"
        if kept.is_dir() and not args.photos and _image_files(kept):
            photos, source = kept, "kept in --work-dir"
        else:
            shutil.rmtree(kept, ignore_errors=True)
            photos, source = _photos(args, work)
        pipe = load_pipeline(args.model)
        images = torch.stack(list(load_training_pixels(list_image_files(photos), args.resolution, True, interpolation=FAMILIES[args.family]["interpolation"])))
        base = eval_loss(pipe, None, images, args)
        print(f"{args.model} ({args.family}): base (no LoRA) eval loss {base:.5f}; photos: {source} ({len(images)}); peer: {script}", flush=True)
        rows = []
        for seed in range(args.seeds):
            peer_out, suti_out = work / f"peer-{seed}", work / f"suti-{seed}"
            peer_s = _run(peer_command(script, folder, photos, peer_out, seed, args), work, work / f"peer-{seed}.log")
            suti_s = _run(suti_command(args.model, photos, suti_out, seed, args), ROOT, work / f"suti-{seed}.log")
            peer = eval_loss(pipe, peer_out / LORA_FILE, images, args)
            ours = eval_loss(pipe, suti_out / LORA_FILE, images, args)
            rows.append({"seed": seed, "suti": ours, "peer": peer, "difference": ours - peer, "suti_seconds": round(suti_s, 1), "peer_seconds": round(peer_s, 1)})
            print(f"seed {seed}: suti {ours:.5f}  peer {peer:.5f}  suti - peer {ours - peer:+.5f}  ({suti_s:.0f} s / {peer_s:.0f} s)", flush=True)
        summary = paired_summary([r["difference"] for r in rows])
        print(f"suti - peer: mean {summary['mean_difference']:+.5f} (standard error {summary['standard_error']:.5f}); "
              f"suti lower in {summary['suti_lower']} of {summary['seeds']} seeds; base {base:.5f}", flush=True)
        cross = cross_load(args.model, folder, work / "suti-0", work / "peer-0" / LORA_FILE, work, args)
        print("cross-loading (seed 0's files): " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in cross.items()), flush=True)
    result = {"model": args.model, "family": args.family, "photos": source, "n_photos": len(images), "steps": args.steps, "learning_rate": args.learning_rate,
              "rank": args.rank, "resolution": args.resolution, "max_sequence_length": args.max_sequence_length, "draws": args.draws,
              "eval_seed": args.eval_seed, "peer_script": str(script), "base_loss": base, **summary, "cross_loading": cross, "rows": rows,
              "command": "python benchmarks/lora_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return result


if __name__ == "__main__":
    main()
