"""``suti expert import`` refuses a LoRA that would leave the base unchanged (an empty file, a
file of another model's layers, an untrained adapter) and a resolution sampling cannot use; a
loaded expert whose LoRA file was emptied is refused the same way."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from experts import load_expert, load_pipeline
from conftest import exit_code


def _diffusers_lora(folder, scale):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipeline("tiny")
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_q"]))
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.fill_(scale)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)), safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def _import(lora, out, *extra):
    return exit_code(["expert", "import", "--lora", str(lora), "--identifier", "sks", "--class-noun", "dog", "--model", "tiny", "--output", str(out), *extra])


@pytest.mark.parametrize("kind, message", [
    ("empty", "holds no tensors"),
    ("foreign", "matches a layer of base tiny"),
    ("untrained", "every LoRA up-projection is zero"),
])
def test_import_refuses_a_lora_that_changes_nothing(tmp_path, capsys, kind, message):
    if kind == "empty":
        lora = tmp_path / "empty.safetensors"
        save_file({}, str(lora))
    elif kind == "foreign":
        lora = tmp_path / "foreign.safetensors"
        save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 8), "transformer.blocks.0.attn.to_q.lora_B.weight": torch.ones(8, 2)}, str(lora))
    else:
        lora = _diffusers_lora(tmp_path / "untrained", 0.0)
    assert _import(lora, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and str(lora.name) in err[-1], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resolution", ["-8", "500", "0"])
def test_import_refuses_a_resolution_sampling_cannot_use(tmp_path, capsys, resolution):
    lora = _diffusers_lora(tmp_path / "l", 0.3)
    assert _import(lora, tmp_path / "out", "--resolution", resolution) == 2
    assert "--resolution" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_loaded_expert_whose_lora_file_was_emptied_is_refused(tmp_path):
    from suti.errors import ModelLoadError

    lora = _diffusers_lora(tmp_path / "l", 0.3)
    assert _import(lora, tmp_path / "out") == 0
    load_expert(tmp_path / "out")
    save_file({}, str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(ModelLoadError, match="holds no tensors"):
        load_expert(tmp_path / "out")


def test_import_takes_a_flux_lora_as_diffusers_flux_script_writes_it(tmp_path, capsys):
    """A LoRA saved as ``train_dreambooth_lora_flux.py`` saves it (peft adapter on the transformer's
    12 target modules, ``FluxPipeline.save_lora_weights``) imports with ``--model tiny-flux``; the
    loaded expert's transformer output equals plain diffusers loading the file, differs from the
    base, and expert.json records FLUX's distilled guidance 3.5 (what ``suti expert sample`` uses)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from suti.models import preset_folder

    targets = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
               "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]  # the script's list
    folder = str(preset_folder("tiny-flux"))
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    FluxPipeline.save_lora_weights(str(tmp_path / "peer"), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    lora = tmp_path / "peer" / "pytorch_lora_weights.safetensors"
    assert exit_code(["expert", "import", "--lora", str(lora), "--identifier", "sks", "--class-noun", "dog", "--model", "tiny-flux",
                      "--output", str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "expert.json").read_text())
    assert info["config"]["guidance_scale"] == 3.5 and info["resolution"] == 32

    def velocity(p):
        b, c, h, w = 1, 16, 4, 4
        latents = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = p.transformer(hidden_states=FluxPipeline._pack_latents(latents, b, c, h, w), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                                pooled_projections=torch.ones(1, 32), encoder_hidden_states=torch.ones(1, 8, 32), txt_ids=torch.zeros(8, 3),
                                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32), return_dict=False)[0]
        return out

    plain = FluxPipeline.from_pretrained(folder)
    base = velocity(plain)
    plain.load_lora_weights(str(lora.parent), weight_name=lora.name)
    expected, got = velocity(plain), velocity(load_expert(tmp_path / "out"))
    assert torch.equal(got, expected) and (got - base).abs().max() > 1e-3
