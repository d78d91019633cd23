"""FLUX experts: flow-matching training as diffusers' train_dreambooth_lora_flux.py, the LoRA file
plain diffusers' FluxPipeline loads, sampling, the denoising loss, stacked FLUX experts."""

import json

import pytest
import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict

from experts import load_pipeline, resolve_config
from experts.batched import train_lora_experts
from experts.evaluate import denoising_loss
from experts.expert import load_expert
from experts.train import train_expert
from orchestration.cli import main
from suti.conditioning import encode_prompt
from suti.denoisers import FluxDenoiser, denoiser_for
from suti.models import preset_folder
from suti.objectives import FlowMatchingObjective, training_objective


def _flux(instance_dir, seed=0, **extra):
    overrides = dict(model="tiny-flux", instance_dir=str(instance_dir), class_noun="dog", steps=12, lora_rank=4, seed=seed, report_to="none",
                     num_class_images=2, class_sample_steps=2, max_sequence_length=32)
    return resolve_config(extra.pop("recipe", "suti-expert"), {**overrides, **extra})


def test_flow_matching_draws_as_diffusers_flux_script():
    """Timesteps, sigmas, noisy input and target equal the script's own formulas on the same
    random numbers (compute_density_for_timestep_sampling, scheduler.timesteps[u * N], its
    get_sigmas lookup, (1 - s) x + s eps, target eps - x), for every weighting scheme."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    pipe = load_pipeline("tiny-flux")
    x, eps = torch.randn(6, 16, 8, 8), torch.randn(6, 16, 8, 8)
    for scheme in ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"):
        objective = training_objective(pipe.scheduler, weighting_scheme=scheme)
        assert isinstance(objective, FlowMatchingObjective)
        t = objective.draw_timesteps(6, torch.Generator().manual_seed(3))
        u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=6, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                  generator=torch.Generator().manual_seed(3))
        reference = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the script's noise_scheduler_copy
        expected_t = reference.timesteps[(u * reference.config.num_train_timesteps).long()]
        assert torch.equal(t, expected_t.float()), scheme
        sigma = torch.stack([reference.sigmas[(reference.timesteps == v).nonzero().item()] for v in expected_t]).view(-1, 1, 1, 1)
        assert torch.allclose(objective.add_noise(x, eps, t), (1.0 - sigma) * x + sigma * eps, atol=1e-6)
        assert torch.equal(objective.target(x, eps, t), eps - x)
        weights = objective.loss_weights(t)
        expected_w = compute_loss_weighting_for_sd3(scheme, sigma.flatten())
        assert (weights is None and torch.equal(expected_w, torch.ones_like(expected_w))) or torch.allclose(weights, expected_w.float())
    assert not hasattr(pipe, "unet") and denoiser_for(pipe).attribute == "transformer"


def test_flux_denoiser_calls_the_transformer_as_flux_pipeline_does():
    """The denoiser's packed call equals what FluxPipeline itself feeds and gets back from the
    transformer at a sampling step (packing, position ids, timestep / 1000, guidance)."""
    pipe = load_pipeline("tiny-flux")
    seen = {}

    def hook(module, args, kwargs, output):
        seen.update(kwargs=kwargs, output=output[0] if isinstance(output, tuple) else output.sample)

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe("a photo of a dog", num_inference_steps=1, height=32, width=32, guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        handle.remove()
    kw = seen["kwargs"]
    noisy = FluxPipeline._unpack_latents(kw["hidden_states"], 32, 32, 2)  # (1, 16, 16, 16)
    cond = encode_prompt(pipe, ["a photo of a dog"])
    denoiser = denoiser_for(pipe, guidance_scale=3.5)
    assert isinstance(denoiser, FluxDenoiser) and torch.equal(kw["guidance"], torch.full((1,), 3.5))
    with torch.no_grad():
        pred = denoiser(noisy, kw["timestep"] * 1000, cond)
    assert torch.allclose(FluxPipeline._pack_latents(pred, 1, 16, 16, 16), seen["output"], atol=1e-5)


def test_flux_lora_expert_trains_loads_in_plain_diffusers_and_samples(instance_dir, tmp_path, capsys):
    """Acceptance: `suti expert train --model tiny-flux --lora-rank 4` writes an expert that plain
    diffusers' FluxPipeline loads (its transformer then predicts what suti's loaded expert does),
    `suti expert sample` writes images, and its denoising loss on its photos is below the base's."""
    out = tmp_path / "expert"
    assert main(["expert", "train", "--model", "tiny-flux", "--instance-dir", str(instance_dir), "--class-noun", "dog", "--lora-rank", "4",
                 "--steps", "30", "--num-class-images", "2", "--max-sequence-length", "32", "--output", str(out)]) == 0
    info = json.loads((out / "expert.json").read_text())
    assert info["kind"] == "lora" and info["base_model"] == "tiny-flux"
    assert info["config"]["guidance_scale"] == 3.5, "FLUX's distilled guidance, not SD's CFG 7.5"

    plain = FluxPipeline.from_pretrained(preset_folder("tiny-flux"))
    plain.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    ours = load_expert(out)
    x, t = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0])
    cond = encode_prompt(ours, ["a photo of a dog"])
    with torch.no_grad():
        a, b = denoiser_for(plain)(x, t, cond), denoiser_for(ours)(x, t, cond)
        base = denoiser_for(load_pipeline("tiny-flux"))(x, t, cond)
    assert torch.allclose(a, b, atol=1e-5) and (a - base).abs().max() > 1e-4, "the LoRA is applied, and the same in both"

    capsys.readouterr()
    assert main(["expert", "sample", "--expert", str(out), "--prompt", "a {V} dog on the beach", "--num-images", "2", "--steps", "2", "--output", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
    capsys.readouterr()
    assert main(["expert", "loss", "--expert", str(out)]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["expert_loss"] < scores["base_loss"], scores

    # issue 34: `suti expert export --format diffusers` of a FLUX expert loads in plain diffusers as
    # the expert; kohya's U-Net layout is refused in one line
    assert main(["expert", "export", "--expert", str(out), "--format", "diffusers", "--output", str(tmp_path / "flux.safetensors")]) == 0
    again = FluxPipeline.from_pretrained(preset_folder("tiny-flux"))
    again.load_lora_weights(str(tmp_path), weight_name="flux.safetensors")
    with torch.no_grad():
        assert torch.allclose(denoiser_for(again)(x, t, cond), b, atol=1e-5)
    capsys.readouterr()
    assert main(["expert", "export", "--expert", str(out), "--format", "kohya", "--output", str(tmp_path / "k.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--format kohya" in err[0] and "--format diffusers" in err[0] and not (tmp_path / "k.safetensors").exists()


def test_flux_text_encoder_lora_trains_clip_only_and_loads(instance_dir, tmp_path):
    """--train-text-encoder on FLUX adapts CLIP (as the flux script), never T5; the file loads."""
    config = _flux(instance_dir, train_text_encoder=True, steps=3, prior_preservation=False)
    train_expert(config, tmp_path / "te", progress=False)
    from safetensors import safe_open

    with safe_open(tmp_path / "te" / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("transformer.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert not any(k.startswith("text_encoder_2.") for k in keys)
    pipe = load_expert(tmp_path / "te")
    assert any("lora_" in n for n, _ in pipe.text_encoder.named_parameters())
    assert not any("lora_" in n for n, _ in pipe.text_encoder_2.named_parameters())


def test_stacked_flux_experts_equal_experts_trained_one_at_a_time(instance_dir, tmp_path):
    """Batched LoRA experts work on FLUX: each of two stacked experts (prior preservation) ends
    within 1e-4 of its own run."""
    pipe = load_pipeline("tiny-flux", device="cpu")
    configs = lambda: [_flux(instance_dir, seed=20 + i, recipe="dreambooth-lora", steps=4, adam_epsilon=1e-6, class_noun=["dog", "cat"][i]) for i in range(2)]  # noqa: E731
    alone = []
    for config in configs():
        train_expert(config, tmp_path / f"alone{config.seed}", progress=False, pipeline=pipe, save=False)
        alone.append({k: v.clone() for k, v in get_peft_model_state_dict(pipe.transformer).items()})
        pipe.transformer.delete_adapters(["default"])
    train_lora_experts(pipe, configs(), ["x0", "x1"])
    for name, weights in zip(["x0", "x1"], alone):
        stacked = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
        assert max(weights[k].abs().max().item() for k in weights if "lora_B" in k) > 1e-4
        assert max((stacked[k] - weights[k]).abs().max().item() for k in weights) < 1e-4, name


def test_flux_denoising_loss_is_the_flow_matching_loss(instance_dir):
    """`suti expert loss` on FLUX scores velocity prediction at the flow schedule's timesteps:
    deterministic per seed, and different timesteps give different losses."""
    from experts.latents import load_training_pixels
    from suti.images import list_image_files

    pipe = load_pipeline("tiny-flux")
    images = torch.stack(load_training_pixels(list_image_files(instance_dir), 32))
    a = denoising_loss(pipe, images, "a dog", seed=1, draws=2)
    assert a == denoising_loss(pipe, images, "a dog", seed=1, draws=2)
    assert denoising_loss(pipe, images, "a dog", draws=1, timesteps=[10]) != denoising_loss(pipe, images, "a dog", draws=1, timesteps=[900])


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--weighting-scheme", "logit_normal"], "--weighting-scheme logit_normal applies to flow-matching models"),
    (["--model", "tiny-flux", "--snr-gamma", "5"], "--snr-gamma 5 applies to epsilon/v-prediction models"),
])
def test_objective_options_of_the_other_family_are_refused_in_one_line(instance_dir, tmp_path, capsys, argv, message):
    code = main(["expert", "train", "--instance-dir", str(instance_dir), "--class-noun", "dog", "--lora-rank", "4", "--steps", "2",
                 "--output", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_a_flux_pipeline_folder_imports_at_its_native_resolution_and_guidance(tmp_path, capsys):
    """`suti expert import --pipeline` of a FLUX folder (no unet/) takes the VAE's sample size
    (32 px for tiny-flux, not the 512 fallback) and FLUX's distilled guidance."""
    load_pipeline("tiny-flux").save_pretrained(tmp_path / "flux", safe_serialization=True)
    assert main(["expert", "import", "--pipeline", str(tmp_path / "flux"), "--identifier", "sks", "--class-noun", "dog", "--output", str(tmp_path / "x")]) == 0
    info = json.loads((tmp_path / "x" / "expert.json").read_text())
    assert info["resolution"] == 32 and info["config"]["guidance_scale"] == 3.5


def test_guidance_scale_is_the_distilled_guidance_fed_while_training(instance_dir, tmp_path):
    """`suti expert train --guidance-scale` on FLUX is the flux script's --guidance_scale: the
    embedding's value during training (so other values train other weights), recorded in expert.json."""
    def weights(scale):
        info = train_expert(_flux(instance_dir, steps=2, prior_preservation=False, guidance_scale=scale), tmp_path / f"g{scale}", progress=False)
        assert info.config["guidance_scale"] == scale
        from safetensors.torch import load_file

        return load_file(str(tmp_path / f"g{scale}" / "pytorch_lora_weights.safetensors"))

    a, b = weights(1.0), weights(3.5)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 0
