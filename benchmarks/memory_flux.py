"""FLUX rows of ``benchmarks/memory.py``: a LoRA expert and the apprentice on ``flux-arch``
(FLUX.1-dev's transformer, random weights) at 1024 px, analytic on PyTorch's ``meta`` device and
measured on a device (CUDA; the CPU with ``tiny-flux`` for tests and ``gpu_suite.py --dry-run``).

Sizes at 1024 px: the 16-channel latent is 128 x 128, packed into 2 x 2 patches: 4096 image tokens;
T5's 512 text tokens (diffusers' ``max_sequence_length``): 4608 tokens in every joint attention.

Dtypes, as diffusers' ``train_dreambooth_lora_flux.py`` keeps them with ``--mixed_precision bf16``:
the frozen transformer (and VAE) in bf16 (``weight_dtype``), activations bf16; the trained
parameters (LoRA, the apprentice's adapter) fp32 with fp32 gradients and AdamW states (the script
upcasts trainable parameters to fp32; here they are fp32 whatever the mixed precision), each
matmul with them casting the weight to bf16, as autocast does. The text encoders are not resident
during training (prompt embeddings computed once, the encoders freed, as the script does without
``--train_text_encoder``); their bf16 size is in each row's note.

The apprentice (UNO-style, Wu et al. 2025, arXiv 2504.02160; the layout of ``apprentice/flux.py``):
each demonstration's clean latents are packed like the target's (4096 tokens each at 1024 px) and
run once per request through the frozen transformer; every block's (19 double-stream + 38
single-stream) image-token input ``F`` is kept, and a decoupled branch per block lets the target's
image tokens attend to the demonstrations:

    out = JointAttn(x) + g * W_o softmax(RoPE(norm(W_q x)) RoPE(norm(W_k F))^T / sqrt(d)) W_v F

``W_q, W_k, W_v, W_o`` are the adapter's (dim x dim, 4 x 9.4M parameters a block at FLUX's width;
``adapter_rank > 0``: a rank-r factorisation instead). In training, the demonstrations' keys and
values of every block are made from the cached ``F`` once per step (with gradients: they stay
alive through the step); in sampling only the keys and values are cached (shared by the guidance
branches). :class:`DemoBranch` is a self-contained stand-in of that branch for counting and
timing; it is not the apprentice's code.

Activations with gradient checkpointing (diffusers checkpoints each transformer block): the
tensors saved for backward are counted on ``meta`` without checkpointing, attributed to the block
that saved them (forward hooks), and combined as checkpointing keeps them: what the layers outside
the blocks save + every block's inputs (the checkpoints) + the largest block's own saved tensors
(recomputed one block at a time in the backward). Not counted: gradients of activations during
the backward, allocator fragmentation, and the temporaries of PyTorch's (foreach) AdamW step,
about one fp32 copy of the trained parameters (8 GiB for the full adapter, nothing to speak of for
LoRA). The measured CUDA rows give the real peaks.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from memory import cpu_peak  # benchmarks/ is on sys.path when a script of it runs

GIB = 2**30
MIB = 2**20
BF16 = torch.bfloat16


def _preset(model: str) -> dict:
    from suti.models import load_preset

    return load_preset(model)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def build_transformer(model: str = "flux-arch", device: str = "meta", lora_rank: int = 0, dtype: torch.dtype = BF16):
    """``FluxTransformer2DModel`` of ``model``'s preset in ``dtype`` (frozen), with LoRA of
    ``lora_rank`` on diffusers' FLUX targets (``experts.train.LORA_TARGETS_TRANSFORMER``; fp32).

    On ``meta`` shapes only; elsewhere the weights are random (normal, std 0.02: the values do not
    change time or memory), made in ``dtype`` directly (a 12B fp32 copy never exists).
    Returns ``(transformer, trainable parameters)``.
    """
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype (no fp32 copy, no cast)
    try:
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**_preset(model)["transformer"])
    finally:
        torch.set_default_dtype(default)
    transformer.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    if lora_rank:
        from peft import LoraConfig

        from experts.train import LORA_TARGETS_TRANSFORMER

        transformer.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS_TRANSFORMER))
        trainable = [p for p in transformer.parameters() if p.requires_grad]
        for p in trainable:
            p.data = p.data.float()
    if device != "meta":
        transformer.to_empty(device=device)
        with torch.no_grad():
            for p in transformer.parameters():
                p.normal_(0, 0.02)
    return transformer, trainable


@functools.lru_cache(maxsize=None)
def frozen_parts(model: str = "flux-arch") -> dict[str, int]:
    """Parameter counts of the preset's VAE, CLIP text encoder and T5 encoder (built on meta)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    preset = _preset(model)
    with torch.device("meta"):
        return {"vae": _numel(AutoencoderKL(**preset["vae"]).parameters()),
                "text_encoder": _numel(CLIPTextModel(CLIPTextConfig(**preset["text_encoder"])).parameters()),
                "text_encoder_2": _numel(T5EncoderModel(T5Config(**preset["text_encoder_2"])).parameters())}


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` in ``x``'s dtype (fp32 master weights cast per call, as autocast does)."""
    return F.linear(x, layer.weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))


class _Proj(nn.Module):
    """dim -> dim: one matrix (``rank`` 0) or two factors (dim -> rank -> dim)."""

    def __init__(self, dim: int, rank: int = 0, bias: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim, bias=bias)] if not rank else [nn.Linear(dim, rank, bias=False), nn.Linear(rank, dim, bias=bias)])

    def forward(self, x):
        for layer in self.layers:
            x = _linear(x, layer)
        return x


class DemoBranch(nn.Module):
    """One block's demonstration attention: ``to_q, to_k, to_v`` and ``to_out`` (dim -> dim, fp32),
    full (``rank`` 0, the layout of ``apprentice/flux.py``) or rank-r factors."""

    def __init__(self, dim: int, rank: int = 0):
        super().__init__()
        self.to_q, self.to_k, self.to_v = _Proj(dim, rank), _Proj(dim, rank), _Proj(dim, rank)
        self.to_out = _Proj(dim, rank, bias=True)


def _rope(x, rotary):
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rotary, sequence_dim=1)


class _BranchProcessor:
    """The block's own FLUX processor, plus (``ctx["mode"]``) ``"capture"``: keep the image
    tokens' input ``F`` (1, n * N, dim); ``"branch"``: add the demonstration attention."""

    def __init__(self, name: str, base, branch: DemoBranch, ctx: dict):
        self.name, self.base, self.branch, self.ctx = name, base, branch, ctx

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs)
        n = self.ctx["image_tokens"]
        image = hidden_states[:, -n:]  # double-stream: the image stream; single-stream: [text; image]'s image part
        if self.ctx["mode"] == "capture":
            self.ctx["features"][self.name] = image.detach().reshape(1, -1, image.shape[-1])
            return out
        keys, values = self.ctx["kv"][self.name]  # (1, n_demos * N, heads, d)
        rotary = (image_rotary_emb[0][-n:], image_rotary_emb[1][-n:])
        query = _rope(attn.norm_q(self.branch.to_q(image).unflatten(-1, (-1, attn.head_dim))), rotary)
        extra = F.scaled_dot_product_attention(query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)).transpose(1, 2).flatten(2)
        extra = self.ctx["scale"] * self.branch.to_out(extra)
        if encoder_hidden_states is None:  # single-stream: out is [text; image]
            return torch.cat([out[:, :-n], out[:, -n:] + extra], dim=1)
        return out[0] + extra, out[1]


def install_branches(transformer, rank: int = 0, device="meta") -> tuple[nn.ModuleDict, dict]:
    """A :class:`DemoBranch` per attention of ``transformer`` (fp32), installed with
    ``set_attn_processor``; returns ``(branches, ctx)``, ``ctx`` steering them."""
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    names = list(transformer.attn_processors)
    with torch.device(device):
        branches = nn.ModuleDict({n.replace(".", "_"): DemoBranch(dim, rank) for n in names})
    if device != "meta":
        with torch.no_grad():
            for p in branches.parameters():
                p.normal_(0, 0.02)
    ctx: dict = {"mode": "capture", "features": {}, "kv": {}, "scale": 1.0, "image_tokens": 0}
    bases = transformer.attn_processors
    transformer.set_attn_processor({n: _BranchProcessor(n, bases[n], branches[n.replace(".", "_")], ctx) for n in names})
    return branches, ctx


def demo_kv(transformer, branches: nn.ModuleDict, ctx: dict, demo_rotary) -> dict:
    """Every block's demonstration keys and values from the cached features (the adapter's
    ``to_k``/``to_v``, the block's RMS norm, RoPE at the demonstrations' positions)."""
    out = {}
    for name, feats in ctx["features"].items():
        attn = transformer.get_submodule(name[: -len(".processor")])
        branch = branches[name.replace(".", "_")]
        k = _rope(attn.norm_k(branch.to_k(feats).unflatten(-1, (-1, attn.head_dim))), demo_rotary)
        out[name] = (k, branch.to_v(feats).unflatten(-1, (-1, attn.head_dim)))
    return out


def _inputs(transformer, batch: int, latent: int, text_tokens: int, device="meta"):
    """Keyword arguments of one transformer call: packed latents (B, latent/2 * latent/2, 64)."""
    cfg = transformer.config
    n = (latent // 2) ** 2
    from diffusers import FluxPipeline

    ids = FluxPipeline._prepare_latent_image_ids(batch, latent // 2, latent // 2, device, BF16)
    return {"hidden_states": torch.randn(batch, n, cfg.in_channels, device=device, dtype=BF16),
            "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.joint_attention_dim, device=device, dtype=BF16),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=BF16),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=BF16),
            "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.float32) if cfg.guidance_embeds else None,
            "img_ids": ids, "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=BF16), "return_dict": False}


def _demo_rotary(transformer, num_demos: int, latent: int, device="meta"):
    """RoPE (cos, sin) of the demonstrations' tokens: demo ``i`` at frame index ``i + 1``
    (FLUX.1 Kontext's placement; the target is at 0)."""
    from diffusers import FluxPipeline

    ids = FluxPipeline._prepare_latent_image_ids(1, latent // 2, latent // 2, device, torch.float32)
    ids = torch.cat([ids.clone().index_fill_(1, torch.tensor([0], device=device), float(i + 1)) for i in range(num_demos)])
    return transformer.pos_embed(ids)


@contextmanager
def _saved_by_block(transformer, skip_params):
    """Tensors autograd saves for backward during the block, attributed to the transformer block
    that saved them (``None``: outside the blocks), each storage counted once; and each block's
    tensor inputs (the checkpoints). Attention probabilities of the math kernel (..., L, L with
    L >= 1024) are kept apart."""
    skip = {p.untyped_storage()._cdata for p in skip_params}
    box = {"owner": None, "saved": {}, "inputs": {}, "attn": {}, "alive": []}

    def size(t):
        return t.numel() * t.element_size() if t.device.type == "meta" else t.untyped_storage().nbytes()

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in skip:
            table = box["attn"] if t.dim() >= 3 and t.shape[-2] >= 1024 and t.shape[-1] >= 1024 else box["saved"]
            owner, old = table.get(key, (box["owner"], 0))
            table[key] = (owner, max(old, size(t)))
        return t

    handles = []
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for i, block in enumerate(blocks):
        def pre(module, args, kwargs, i=i):
            box["owner"] = i
            for t in list(args) + list(kwargs.values()) + list(kwargs.get("image_rotary_emb") or ()):
                if isinstance(t, torch.Tensor):
                    box["inputs"][t.untyped_storage()._cdata] = size(t)
                    box["alive"].append(t)  # a freed storage's id could be reused by a later tensor

        def post(module, args, output):
            box["owner"] = None

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield box
    finally:
        for h in handles:
            h.remove()


def _checkpointed(box, persist: set = frozenset()) -> dict:
    """Activations with and without per-block gradient checkpointing (bytes), from
    :func:`_saved_by_block`'s record; ``persist``: storages alive all step anyway (not counted)."""
    saved = {k: v for k, v in box["saved"].items() if k not in persist}
    outside = {k: b for k, (o, b) in saved.items() if o is None}
    per_block: dict[int, int] = {}
    for k, (o, b) in saved.items():
        if o is not None and k not in box["inputs"]:
            per_block[o] = per_block.get(o, 0) + b
    kept = {**outside, **{k: b for k, b in box["inputs"].items() if k not in persist}}
    return {"checkpointed": sum(kept.values()) + max(per_block.values(), default=0),
            "full": sum(b for _, b in saved.values()), "attention_probs": sum(b for _, b in box["attn"].values()),
            "attention_probs_one_block": max((b for _, b in box["attn"].values()), default=0)}


def _row(case, weights, trainable, activations, attention_probs=0, other=0, note=""):
    total = weights + 4 * trainable + activations + other  # + grads (1x) + AdamW (2x)
    return {"case": case, "weights_gib": weights / GIB, "grads_gib": trainable / GIB, "adamw_gib": 2 * trainable / GIB, "activations_gib": activations / GIB,
            "math_attention_probs_gib": attention_probs / GIB, "other_gib": other / GIB, "peak_gib": total / GIB, "note": note}


def analytic_flux(resolution: int = 1024, num_demos: int = 3, lora_rank: int = 4, adapter_rank: int = 0, text_tokens: int = 512,
                  model: str = "flux-arch", class_images: int = 1) -> list[dict]:
    """The FLUX rows at ``resolution`` on the meta device (module docstring): a LoRA expert
    (``lora_rank``, batch 1 + ``class_images``), apprentice training (``num_demos``, batch 1)
    and apprentice sampling (one image), all with gradient checkpointing where they train."""
    parts = frozen_parts(model)
    vae_bytes, text_bytes = 2 * parts["vae"], 2 * (parts["text_encoder"] + parts["text_encoder_2"])
    texts = f"text encoders not resident ({text_bytes / GIB:.1f} GiB bf16: CLIP-L {parts['text_encoder'] / 1e6:.0f}M + T5 {parts['text_encoder_2'] / 1e9:.2f}B)"
    rows = []
    transformer, lora = build_transformer(model, "meta", lora_rank)
    scale = 2 ** (len(_preset(model)["vae"]["block_out_channels"]) - 1)
    latent = resolution // scale
    tokens = (latent // 2) ** 2
    batch = 1 + class_images
    with _saved_by_block(transformer, transformer.parameters()) as box:
        transformer(**_inputs(transformer, batch, latent, text_tokens))
    acts = _checkpointed(box)
    base = _nbytes(p for p in transformer.parameters() if not p.requires_grad)
    rows.append({**_row(f"flux expert training, LoRA rank {lora_rank}, gradient checkpointing ({model}, {resolution} px, {tokens} + {text_tokens} tokens, batch 1 + {class_images})",
                     base + vae_bytes, _nbytes(lora), acts["checkpointed"], acts["attention_probs_one_block"],
                     note=(f"bf16 base + VAE, {_numel(lora) / 1e6:.2f}M LoRA params fp32 (grads, AdamW fp32); without checkpointing the activations "
                           f"are {acts['full'] / GIB:.1f} GiB; {texts}")), "activations_without_checkpointing_gib": acts["full"] / GIB})
    del transformer, lora
    transformer, _ = build_transformer(model, "meta", 0)
    branches, ctx = install_branches(transformer, adapter_rank)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    ctx.update(mode="branch", image_tokens=tokens)
    ctx["features"] = {n: torch.empty(1, num_demos * tokens, dim, device="meta", dtype=BF16) for n in transformer.attn_processors}
    feats = _nbytes(ctx["features"].values())
    with _saved_by_block(transformer, list(transformer.parameters()) + list(ctx["features"].values())) as box:
        ctx["kv"] = demo_kv(transformer, branches, ctx, _demo_rotary(transformer, num_demos, latent))
        transformer(**_inputs(transformer, 1, latent, text_tokens))
    kv = {t.untyped_storage()._cdata: t.numel() * t.element_size() for pair in ctx["kv"].values() for t in pair}
    acts = _checkpointed(box, persist=set(kv))
    n_adapter = _numel(branches.parameters())
    layers = len(ctx["features"])
    rows.append(_row(f"flux apprentice training, {num_demos} demos, adapter {'full' if not adapter_rank else f'rank {adapter_rank}'}, gradient checkpointing ({model}, {resolution} px, batch 1)",
                     base + vae_bytes, 4 * n_adapter, acts["checkpointed"] + sum(kv.values()), acts["attention_probs_one_block"], other=feats,
                     note=(f"adapter {n_adapter / 1e9:.3f}B params fp32 ({layers} blocks); other = the demos' cached block inputs F ({num_demos} x {tokens} tokens x {layers} blocks x {dim} bf16); "
                           f"activations include the demos' keys/values of all blocks ({sum(kv.values()) / GIB:.2f} GiB, made once per step with gradients); {texts}")))
    kv_cache = 2 * feats  # sampling: keys and values, bf16
    weights = base + vae_bytes + 2 * n_adapter
    rows.append({"case": f"flux apprentice sampling, {num_demos} demos, 1 image, bf16 ({model}, {resolution} px)", "weights_gib": weights / GIB,
                 "demo_kv_shared_gib": kv_cache / GIB, "peak_gib": (weights + kv_cache) / GIB,
                 "note": (f"keys/values: {num_demos} demos x {tokens} tokens x {layers} blocks x 2 x {dim} x 2 bytes, shared by the guidance branches; "
                          f"+ transient activations of one call (see the measured rows) + {texts}")})
    return rows


# --- measured on a device -------------------------------------------------------------------------


def _peak(fn, device: str) -> tuple[int, float]:
    """Peak bytes during ``fn()`` and seconds: CUDA ``max_memory_allocated`` (absolute: weights
    included); elsewhere the resident set's peak above its start (``memory.cpu_peak``)."""
    if device != "cuda":
        return cpu_peak(fn)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), time.perf_counter() - started


def _step(transformer, params, kw, before=None):
    opt = torch.optim.AdamW(params, lr=1e-6)

    def run():
        if before is not None:
            before()
        loss = transformer(**kw)[0].float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _setup(model: str, resolution: int):
    scale = 2 ** (len(_preset(model)["vae"]["block_out_channels"]) - 1)
    latent = resolution // scale
    return latent, (latent // 2) ** 2


def _timed(fn, device: str, steps: int) -> tuple[int, float]:
    """Peak of one call of ``fn`` (after a warm-up call, which also allocates AdamW's states) and
    the median seconds of ``steps`` more calls."""
    fn()
    peak, _ = _peak(fn, device)
    times = []
    for _ in range(steps):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return peak, statistics.median(times)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_values(peak: int, device: str, before: int = 0) -> dict:
    if device == "cuda":
        return {"peak_gib": round((peak - before) / GIB, 3)}
    return {"peak_rss_above_start_mib": round(peak / MIB, 1)}


def measured_flux_expert(device: str = "cuda", model: str = "flux-arch", resolution: int = 1024, lora_rank: int = 4, text_tokens: int = 512,
                         class_images: int = 1, steps: int = 2) -> dict:
    """One training step of a LoRA expert (bf16 base, fp32 LoRA, AdamW, gradient checkpointing,
    batch 1 + ``class_images``) on ``device``: peak memory and the median seconds of ``steps``
    steps after a warm-up step.

    ``peak_gib`` on CUDA: ``max_memory_allocated`` above what the process held before the model
    was built (weights included); on the CPU ``peak_rss_above_start_mib`` of the step (a smoke
    test of the code path, not a figure to read).
    """
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    latent, _ = _setup(model, resolution)
    transformer, lora = build_transformer(model, device, lora_rank)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    peak, seconds = _timed(_step(transformer, lora, _inputs(transformer, 1 + class_images, latent, text_tokens, device)), device, steps)
    del transformer, lora
    _free(device)
    return {"case": f"flux expert training step, LoRA rank {lora_rank}, gradient checkpointing ({model}, {resolution} px, bf16 base, batch 1 + {class_images}, {device})",
            **_peak_values(peak, device, before), "seconds_per_step": round(seconds, 3), "steps_timed": steps}


def measured_flux_apprentice(device: str = "cuda", model: str = "flux-arch", resolution: int = 1024, num_demos: int = 3, adapter_rank: int = 0,
                             text_tokens: int = 512, steps: int = 2) -> dict:
    """The apprentice's demonstration pass (no gradients, once per request: seconds and peak) and
    one training step (batch 1, the demos' keys/values made from the cached features with
    gradients, gradient checkpointing) on ``device``; peaks as :func:`measured_flux_expert`."""
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    latent, tokens = _setup(model, resolution)
    transformer, _ = build_transformer(model, device, 0)
    branches, ctx = install_branches(transformer, adapter_rank, device)
    transformer.enable_gradient_checkpointing()
    ctx["image_tokens"] = tokens
    demos = _inputs(transformer, num_demos, latent, text_tokens, device)
    demos["timestep"] = torch.full((num_demos,), 0.001, device=device, dtype=BF16)

    def demo_pass():
        ctx.update(mode="capture", features={})
        with torch.no_grad():
            transformer(**demos)
    peak_demo, demo_s = _timed(demo_pass, device, 1)
    ctx["mode"] = "branch"
    rotary = _demo_rotary(transformer, num_demos, latent, device)

    def make_kv():  # with gradients, every step
        ctx["kv"] = demo_kv(transformer, branches, ctx, rotary)
    peak, seconds = _timed(_step(transformer, list(branches.parameters()), _inputs(transformer, 1, latent, text_tokens, device), before=make_kv), device, steps)
    n_adapter = _numel(branches.parameters())
    del transformer, branches, ctx
    _free(device)
    return {"case": (f"flux apprentice training step, {num_demos} demos, adapter {'full' if not adapter_rank else f'rank {adapter_rank}'}, "
                     f"gradient checkpointing ({model}, {resolution} px, batch 1, {device})"),
            **_peak_values(peak, device, before), "seconds_per_step": round(seconds, 3), "steps_timed": steps, "demo_pass_s": round(demo_s, 3),
            **{f"demo_pass_{k}": v for k, v in _peak_values(peak_demo, device, before).items()}, "adapter_params_m": round(n_adapter / 1e6, 2)}


def measured_flux(device: str = "cuda", model: str = "flux-arch", resolution: int = 1024, num_demos: int = 3, lora_rank: int = 4,
                  adapter_rank: int = 0, text_tokens: int = 512, steps: int = 2) -> list[dict]:
    """:func:`measured_flux_expert` and :func:`measured_flux_apprentice`, one after the other."""
    return [measured_flux_expert(device, model, resolution, lora_rank, text_tokens, steps=steps),
            measured_flux_apprentice(device, model, resolution, num_demos, adapter_rank, text_tokens, steps=steps)]
