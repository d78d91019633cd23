"""Peak memory of expert training (full, LoRA), apprentice training (frozen base) and apprentice
sampling (3 demonstrations), for the ``sd15-arch`` preset (Stable Diffusion 1.5's architecture) at
512 px; and measurements that show what chunked VAE encoding and shared demonstration keys/values
save.

Three kinds of figures, each labelled:

* **analytic, 512 px** - the models are built on PyTorch's ``meta`` device (shapes, no memory):
  parameters, gradients and AdamW states are counted exactly; activations are the tensors autograd
  saves for the backward pass of one real forward on ``meta`` inputs (``saved_tensors_hooks``,
  each storage counted once); demonstration keys/values from the layers' shapes. Attention
  probabilities that the math attention kernel saves (B x heads x L x L) are listed apart: the
  flash / memory-efficient kernels that CUDA uses do not store them.
* **measured, CPU, small** - peak resident memory (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each case) above the resident memory before it:
  VAE-encoding N images in one call against chunks (``AutoencoderKL`` of sd15-arch), and one
  apprentice sampling step of sd15-arch's U-Net with the demonstrations' keys/values shared
  against repeated per guidance branch and image (the old path).
* **measured, CUDA, 512 px** - ``torch.cuda.max_memory_allocated`` for every case, when a GPU is
  visible (``--cuda``; default: when available).


FLUX rows (``benchmarks/memory_flux.py``): ``flux-arch`` (FLUX.1-dev's 11.9B transformer) at
``--flux-resolution`` (1024 px: 4096 image + 512 text tokens), a LoRA expert and the apprentice
with 3 demonstrations, bf16 base and gradient checkpointing: analytic on ``meta`` (~10 s) and,
with ``--cuda``, one measured training step of each (the transformer alone on the GPU, ~24 GB).

    python benchmarks/memory.py                 # analytic + CPU measurements (~1-2 min)
    python benchmarks/memory.py --quick         # small CPU sizes only (CI / --dry-run)
    python benchmarks/memory.py --cuda          # add the real CUDA peaks at 512 px (and FLUX's at 1024 px)
    python benchmarks/memory.py --flux-only     # the flux-arch rows alone (with --cuda: measured too)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import contextmanager

import torch

from suti.checks import whole

GIB = 2**30
MIB = 2**20


def _preset(model: str = "sd15-arch"):
    from suti.models import load_preset

    return load_preset(model)


def _added(unet, batch: int, device: str = "meta"):
    """SDXL's ``added_cond_kwargs`` (pooled text embeddings, 6 time ids) for ``batch``; ``None`` for SD."""
    if unet.config.addition_embed_type != "text_time":
        return None
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {"text_embeds": torch.empty(batch, pooled, device=device), "time_ids": torch.empty(batch, 6, device=device)}


def _unet_kw(unet, batch: int) -> dict:
    added = _added(unet, batch)
    return {} if added is None else {"added_cond_kwargs": added}


def _models(device: str = "meta", model: str = "sd15-arch"):
    """sd15-arch's U-Net, VAE and text encoder; on ``meta`` shapes only. Elsewhere only the U-Net
    is materialised (uninitialised memory filled with small random values: weights do not change
    memory), the VAE and text encoder stay on ``meta``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = _preset(model)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset["unet"])
        vae = AutoencoderKL(**preset["vae"])
        text = CLIPTextModel(CLIPTextConfig(**preset["text_encoder"]))
        if "text_encoder_2" in preset:  # SDXL: both text encoders count as frozen weights
            text = torch.nn.ModuleList([text, CLIPTextModelWithProjection(CLIPTextConfig(**preset["text_encoder_2"]))])
    if device != "meta":
        _materialise(unet, device)
    return unet, vae, text


def _materialise(module, device: str):
    module.to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@contextmanager
def _saved_tensors(exclude_params):
    """Collect the storages autograd saves for backward (each counted once)."""
    skip = {p.untyped_storage()._cdata for p in exclude_params}
    seen: dict[int, int] = {}
    attn: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in skip:
            size = t.untyped_storage().nbytes() if t.device.type != "meta" else t.numel() * t.element_size()
            # attention probabilities of the math kernel: (..., L, L) with a long sequence
            if t.dim() >= 3 and t.shape[-2] >= 1024 and t.shape[-1] >= 1024:
                attn[key] = max(attn.get(key, 0), size)
            else:
                seen[key] = max(seen.get(key, 0), size)
        return t

    box = {"activations": 0, "attention_probs": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield box
    box["activations"] = sum(v for k, v in seen.items() if k not in attn)
    box["attention_probs"] = sum(attn.values())


def _row(name, weights, trainable, activations, attention_probs=0, extra=0, note=""):
    grads = trainable
    adam = 2 * trainable
    total = weights + grads + adam + activations + extra
    return {"case": name, "weights_gib": weights / GIB, "grads_gib": grads / GIB, "adamw_gib": adam / GIB, "activations_gib": activations / GIB,
            "math_attention_probs_gib": attention_probs / GIB, "other_gib": extra / GIB, "peak_gib": total / GIB, "note": note}


def _lora(unet, rank: int):
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    return [p for p in unet.parameters() if p.requires_grad]


def analytic(resolution: int = 512, num_demos: int = 3, lora_rank: int = 4, model: str = "sd15-arch") -> list[dict]:
    """The four cases at ``resolution`` on the meta device (fp32 weights and activations), for
    ``model`` (``sd15-arch``, or ``sdxl-arch`` with its second text encoder and add_embeds)."""
    from apprentice.adapter import DemoAttentionAdapter

    latent = resolution // 8
    rows = []
    unet, vae, text = _models("meta", model)
    frozen = _nbytes(vae.parameters()) + _nbytes(text.parameters())
    t = torch.full((2,), 500, device="meta")
    x = torch.empty(2, 4, latent, latent, device="meta")
    emb = torch.empty(2, 77, unet.config.cross_attention_dim, device="meta")
    # expert, full fine-tuning: instance + class image per step (prior preservation, batch 1 + 1)
    with _saved_tensors(unet.parameters()) as saved:
        unet(x, t, emb, **_unet_kw(unet, 2)).sample
    rows.append(_row("expert training, full (U-Net; batch 1 + 1 class image)", _nbytes(unet.parameters()) + frozen, _nbytes(unet.parameters()),
                     saved["activations"], saved["attention_probs"], note="AdamW fp32; VAE encode of the class images: see the VAE rows"))
    # expert, LoRA
    unet_l, _, _ = _models("meta", model)
    trainable = _lora(unet_l, lora_rank)
    with _saved_tensors(unet_l.parameters()) as saved:
        unet_l(x, t, emb, **_unet_kw(unet_l, 2)).sample
    rows.append(_row(f"expert training, LoRA rank {lora_rank} (batch 1 + 1)", _nbytes(unet_l.parameters()) + frozen, _nbytes(trainable),
                     saved["activations"], saved["attention_probs"], note=f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable"))
    del unet_l
    # apprentice, frozen base: one example (3 demos + the target), the adapter trains
    unet.requires_grad_(False)
    adapter = DemoAttentionAdapter.for_unet(unet, init_from_self_attention=False)
    adapter.install(unet)
    demos = torch.empty(1, num_demos, 4, latent, latent, device="meta")
    demo_emb = torch.empty(1, num_demos, 77, unet.config.cross_attention_dim, device="meta")
    with _saved_tensors(list(unet.parameters()) + list(adapter.parameters())) as saved:
        ctx = adapter.encode_demos(unet, demos, demo_emb, added_cond_kwargs=_added(unet, num_demos))
        unet(x[:1], t[:1], emb[:1], cross_attention_kwargs={"demo": ctx}, **_unet_kw(unet, 1)).sample
    kv = sum(a.numel() * 4 + b.numel() * 4 for a, b in ctx.kv.values())  # fp32, one request
    rows.append(_row(f"apprentice training, frozen base ({num_demos} demos, batch 1)", _nbytes(unet.parameters()) + frozen + _nbytes(adapter.parameters()),
                     _nbytes(adapter.parameters()), saved["activations"], saved["attention_probs"],
                     note=f"adapter {sum(p.numel() for p in adapter.parameters()) / 1e6:.1f}M params; activations scale with the micro-batch"))
    # apprentice sampling: weights + cached keys/values (no backward); 3 guidance branches
    weights = _nbytes(unet.parameters()) + frozen + _nbytes(adapter.parameters())
    for dtype_name, nbytes in (("fp32", 4), ("fp16", 2)):
        kv_d = kv * nbytes // 4
        rows.append({"case": f"apprentice sampling, {num_demos} demos, 1 image, {dtype_name}", "weights_gib": weights * nbytes / 4 / GIB,
                     "demo_kv_shared_gib": kv_d / GIB, "demo_kv_repeated_per_branch_gib": 3 * kv_d / GIB,
                     "peak_gib": (weights * nbytes / 4 + kv_d) / GIB,
                     "note": "peak = weights + shared K/V (+ transient activations of one 3-branch U-Net call; see the CUDA rows)"})
    return rows


# --- measured on CPU ------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its peak), bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return _proc_status_bytes("VmRSS")


def _hwm() -> int:
    return _proc_status_bytes("VmHWM")


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so a case cannot reuse an earlier one's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak(fn) -> tuple[int, float]:
    """Peak resident bytes above the current resident set while ``fn()`` runs (Linux), seconds."""
    gc.collect()
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss()
    started = time.perf_counter()
    fn()
    seconds = time.perf_counter() - started
    return max(0, _hwm() - before), seconds


def encode_in_chunks(vae, pixels: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """VAE latents of ``pixels`` (N, 3, H, W), ``batch_size`` images per encoder call (None: all)."""
    step = batch_size or pixels.shape[0]
    with torch.no_grad():
        return torch.cat([vae.encode(pixels[i:i + step]).latent_dist.mean for i in range(0, pixels.shape[0], step)])


def measured_vae(size: int, n: int, chunk: int, device: str = "cpu") -> list[dict]:
    """Peak of VAE-encoding ``n`` images of ``size`` px at once vs ``chunk`` at a time."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**_preset()["vae"])
    _materialise(vae, device)
    pixels = torch.rand(n, 3, size, size, device=device) * 2 - 1
    rows = []
    results = {}
    encode_in_chunks(vae, pixels[:1], 1)  # warm-up: one-time allocations are not counted
    # chunks first: if memory freed by one case were reused by the next, it would favour one call
    for label, bs in ((f"chunks of {chunk}", chunk), ("one call", None)):
        if device == "cuda":
            peak, seconds = cuda_peak(lambda: results.__setitem__(label, encode_in_chunks(vae, pixels, bs)))
        else:
            peak, seconds = cpu_peak(lambda: results.__setitem__(label, encode_in_chunks(vae, pixels, bs)))
        rows.append({"case": f"VAE encode, {n} images at {size} px, {label}", "peak_mib": peak / MIB, "per_image_mib": peak / MIB / (bs or n), "seconds": round(seconds, 2)})
    torch.testing.assert_close(results["one call"], results[f"chunks of {chunk}"], atol=1e-4, rtol=1e-4)
    return rows


def _old_repeat(ctx, times):
    """The previous DemoContext.repeat: keys/values copied per branch and image."""
    from apprentice.attention import DemoContext

    kv = {k: (a.repeat(times, 1, 1, 1), b.repeat(times, 1, 1, 1)) for k, (a, b) in ctx.kv.items()}
    return DemoContext(mode=ctx.mode, num_demos=ctx.num_demos, kv=kv, scale=ctx.scale)


def measured_demo_kv(latent: int, num_images: int, num_demos: int = 3, device: str = "cpu", unet=None) -> list[dict]:
    """Peak of one 3-branch sampling step of sd15-arch's U-Net with the request's demonstration
    keys/values shared (now) vs repeated per branch and image (before)."""
    from apprentice.adapter import DemoAttentionAdapter

    if unet is None:
        unet, _, _ = _models(device)
    unet.requires_grad_(False)
    adapter = DemoAttentionAdapter.for_unet(unet).to(device)
    adapter.install(unet)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        ctx = adapter.encode_demos(unet, torch.randn(1, num_demos, 4, latent, latent, generator=g).to(device), torch.randn(1, num_demos, 77, 768, generator=g).to(device))
    batch = 3 * num_images
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    emb = torch.randn(batch, 77, 768, generator=g).to(device)
    outs = {}
    rows = []

    def step(make):
        def run():
            batch_ctx = make()
            with torch.no_grad():
                outs[make.__name__] = unet(x, 500, emb, cross_attention_kwargs={"demo": batch_ctx}).sample
        return run

    def shared():
        return ctx.repeat(batch)

    def repeated():
        return _old_repeat(ctx, batch)

    with torch.no_grad():  # warm-up: one-time allocations are not counted
        unet(x[:1], 500, emb[:1], cross_attention_kwargs={"demo": ctx}).sample
    for make in (shared, repeated):  # shared first: any reuse of freed memory favours the old path
        peak, seconds = (cuda_peak if device == "cuda" else cpu_peak)(step(make))
        rows.append({"case": f"apprentice sampling step, {num_demos} demos, {num_images} images x 3 branches, latents {latent}x{latent}, K/V {make.__name__}",
                     "peak_mib": peak / MIB, "kv_cache_mib": (ctx.cache_bytes() * (batch if make is repeated else 1)) / MIB, "seconds": round(seconds, 2)})
    torch.testing.assert_close(outs["shared"], outs["repeated"], atol=1e-4, rtol=1e-4)
    return rows


# --- CUDA -----------------------------------------------------------------------------------------


def cuda_peak(fn) -> tuple[int, float]:
    """``max_memory_allocated`` above the memory allocated before ``fn()`` (CUDA), seconds."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, time.perf_counter() - started


def cuda_rows(resolution: int = 512, num_demos: int = 3, lora_rank: int = 4) -> list[dict]:
    """Real peaks on the GPU (fp32 weights, AdamW) for one training step / one sampling step."""
    latent = resolution // 8
    rows = []
    dev = "cuda"

    def train_step(unet, params, batch, ctx_fn=None):
        opt = torch.optim.AdamW(params, lr=1e-6)
        x = torch.randn(batch, 4, latent, latent, device=dev)
        emb = torch.randn(batch, 77, 768, device=dev)
        t = torch.full((batch,), 500, device=dev)

        def run():
            kw = {"cross_attention_kwargs": {"demo": ctx_fn()}} if ctx_fn else {}
            loss = unet(x, t, emb, **kw).sample.float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        return run

    unet, _, _ = _models(dev)
    base = torch.cuda.memory_allocated()
    peak, s = cuda_peak(train_step(unet, list(unet.parameters()), 2))
    rows.append({"case": "CUDA: expert training step, full (batch 1 + 1)", "peak_gib": (base + peak) / GIB, "seconds": round(s, 2)})
    del unet
    gc.collect()
    torch.cuda.empty_cache()
    unet, _, _ = _models("meta")
    _lora(unet, lora_rank)
    _materialise(unet, dev)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    base = torch.cuda.memory_allocated()
    peak, s = cuda_peak(train_step(unet, trainable, 2))
    rows.append({"case": f"CUDA: expert training step, LoRA rank {lora_rank} (batch 1 + 1)", "peak_gib": (base + peak) / GIB, "seconds": round(s, 2)})
    del unet, trainable
    gc.collect()
    torch.cuda.empty_cache()
    from apprentice.adapter import DemoAttentionAdapter

    unet, _, _ = _models(dev)
    unet.requires_grad_(False)
    adapter = DemoAttentionAdapter.for_unet(unet).to(dev)
    adapter.install(unet)
    demos = torch.randn(1, num_demos, 4, latent, latent, device=dev)
    demo_emb = torch.randn(1, num_demos, 77, 768, device=dev)
    base = torch.cuda.memory_allocated()
    peak, s = cuda_peak(train_step(unet, list(adapter.parameters()), 1, lambda: adapter.encode_demos(unet, demos, demo_emb)))
    rows.append({"case": f"CUDA: apprentice training step, frozen base ({num_demos} demos, batch 1)", "peak_gib": (base + peak) / GIB, "seconds": round(s, 2)})
    for r in measured_demo_kv(latent, 1, num_demos, device=dev, unet=unet):
        r["case"] = "CUDA: " + r["case"]
        rows.append(r)
    del unet, adapter
    gc.collect()
    torch.cuda.empty_cache()
    for r in measured_vae(resolution, 8, 2, device=dev):
        r["case"] = "CUDA: " + r["case"]
        rows.append(r)
    return rows


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n== {title} ==")
    for r in rows:
        vals = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k not in ("case", "note"))
        print(f"{r['case']}: {vals}" + (f"  ({r['note']})" if r.get("note") else ""))


def _flux(args, out: dict, measured: bool) -> dict:
    """The flux-arch rows (analytic; measured on CUDA when ``measured``), then ``--json``."""
    from memory_flux import analytic_flux, measured_flux

    res, rank = args.flux_resolution, args.flux_adapter_rank
    out["analytic_flux"] = analytic_flux(res, adapter_rank=rank)
    _print(f"flux-arch at {res} px, analytic (meta device, bf16 base, fp32 trained params + AdamW, gradient checkpointing)", out["analytic_flux"])
    if measured:
        out["measured_cuda_flux"] = measured_flux("cuda", "flux-arch", res, adapter_rank=rank)
        _print(f"flux-arch at {res} px, measured on CUDA (max_memory_allocated, weights included)", out["measured_cuda_flux"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="small CPU measurements only (CI)")
    p.add_argument("--vae-size", type=int, default=128, help="image size of the CPU VAE measurement")
    p.add_argument("--vae-images", type=int, default=8)
    p.add_argument("--vae-chunk", type=int, default=2)
    p.add_argument("--kv-latent", type=int, default=8, help="latent size of the CPU sampling measurement (sd15-arch U-Net)")
    p.add_argument("--kv-images", type=int, default=4)
    p.add_argument("--cuda", action="store_true", default=None, help="also measure on CUDA (default: when available)")
    p.add_argument("--sdxl-resolution", type=int, default=1024, help="resolution of the sdxl-arch rows (0: none)")
    p.add_argument("--flux-resolution", type=whole(0, 4096), default=1024, help="resolution of the flux-arch rows (0: none)")
    p.add_argument("--flux-adapter-rank", type=whole(0, 3072), default=0, help="the FLUX apprentice's adapter: 0 full dim x dim projections, else rank-r factors")
    p.add_argument("--flux-only", action="store_true", help="only the flux-arch rows (analytic; measured with --cuda)")
    p.add_argument("--json", help="write all rows here")
    args = p.parse_args(argv)
    if args.flux_only and not args.flux_resolution:
        p.error("--flux-only needs --flux-resolution > 0")
    if args.flux_resolution % 16:
        p.error(f"--flux-resolution must be a multiple of 16 (2x2 patches of the 8x latent), got {args.flux_resolution}")
    torch.manual_seed(0)
    out: dict = {}
    if args.flux_only:
        return _flux(args, out, measured=bool(args.cuda or (args.cuda is None and torch.cuda.is_available())))
    if not args.quick:
        out["analytic"] = analytic(args.resolution)
        _print(f"sd15-arch at {args.resolution} px, analytic (meta device, fp32, AdamW)", out["analytic"])
        if args.sdxl_resolution:
            out["analytic_sdxl"] = analytic(args.sdxl_resolution, model="sdxl-arch")
            _print(f"sdxl-arch at {args.sdxl_resolution} px, analytic (meta device, fp32, AdamW)", out["analytic_sdxl"])
    vae_size, vae_n, kv_latent, kv_images = (args.vae_size, args.vae_images, args.kv_latent, args.kv_images) if not args.quick else (32, 4, 8, 2)
    vae = measured_vae(vae_size, vae_n, args.vae_chunk)
    chunked_row, one_row = vae
    marginal = (one_row["peak_mib"] - chunked_row["peak_mib"]) / (vae_n - args.vae_chunk)  # MiB per extra image in one call
    scale = (args.resolution / vae_size) ** 2
    one_row["note"] = (f"marginal {marginal:.1f} MiB per image in one call; x{scale:.0f} pixels at {args.resolution} px: "
                      f"~{marginal * scale / 1024:.2f} GiB per image, ~{marginal * scale * 100 / 1024:.0f} GiB for 100 class images in one call")
    out["measured_cpu"] = vae + measured_demo_kv(kv_latent, kv_images)
    _print("measured on CPU (peak RSS above the start of each case)", out["measured_cpu"])
    chunked, one = out["measured_cpu"][0]["peak_mib"], out["measured_cpu"][1]["peak_mib"]
    shared, rep = out["measured_cpu"][2]["peak_mib"], out["measured_cpu"][3]["peak_mib"]
    print(f"\nchunked VAE encoding lowers the measured peak: {one:.0f} -> {chunked:.0f} MiB ({chunked / max(one, 1e-9):.2f}x)")
    print(f"shared demo keys/values lower the measured peak: {rep:.0f} -> {shared:.0f} MiB ({shared / max(rep, 1e-9):.2f}x)")
    if args.cuda or (args.cuda is None and torch.cuda.is_available() and not args.quick):
        out["measured_cuda"] = cuda_rows(args.resolution)
        _print(f"measured on CUDA at {args.resolution} px (max_memory_allocated)", out["measured_cuda"])
    if not args.quick and args.flux_resolution:
        return _flux(args, out, measured="measured_cuda" in out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
