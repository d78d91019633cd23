"""Stacked multi-LoRA: K LoRA experts on one frozen base, one batched matmul per layer.

Each LoRA-targeted ``nn.Linear`` of the model becomes a :class:`StackedLoRALinear` holding one
stacked ``lora_A`` (K, r, in) and one ``lora_B`` (K, out, r). The rows of a batch belong to
experts (:meth:`StackedLoRA.route`); the LoRA term of every row is computed for all experts at
once:

* rows grouped by expert, the same number each (training: expert after expert):
  ``x.view(K, m, in) @ A^T @ B^T`` - two ``bmm`` per layer, forward and backward, whatever K;
* any other routing (sampling with classifier-free guidance runs ``cat([uncond, cond])``): the
  rows' own matrices are gathered (``A[idx]``) and multiplied row by row - still two ``bmm``.

The kernels per step therefore do not grow with K, unlike peft's mixed-adapter batches, which
loop over the adapters in every layer. The layers are built from peft adapters already on the
model (:meth:`StackedLoRA.from_peft`: the initialisation of each expert is its own adapter's,
drawn as a lone run draws it) and written back into them (:meth:`StackedLoRA.write_back`), so
each expert saves through peft and diffusers exactly as an expert trained alone
(``pytorch_lora_weights.safetensors``, the ``load_lora_weights`` layout, the same keys). They
wrap any ``nn.Linear`` that peft targets, in a U-Net or a diffusion transformer alike.

The optimizer side (:class:`StackedAdafactor`, :func:`clip_grad_norm_per_expert`) keeps every
expert's update equal to its own run's: AdamW is elementwise; Adafactor factors its second
moment per matrix, so it is factored per expert slice, and its update is clipped by each
slice's RMS; gradients are clipped per expert over that expert's slices only.

Sources: Hu et al. 2021 (LoRA); Sheng et al. 2023 (S-LoRA) and Chen et al. 2023 (Punica) for
batched multi-adapter LoRA; Shazeer & Stern 2018 (Adafactor), as ``transformers.Adafactor``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn


class Route:
    """Which expert each row of the current batch belongs to, shared by every stacked layer.

    ``experts``: a LongTensor (rows,) of expert indices, or ``None`` (the layers add no LoRA
    term: the base model). When the rows come in runs of equal length ``group``, one expert per
    run (``runs``: those experts in order; training and most sampling calls), a layer multiplies
    each run by its expert's matrices with one ``bmm`` (the fast path); otherwise every row's
    matrices are gathered. A layer input with a whole multiple of the routed rows repeats the
    routing (classifier-free guidance's ``cat([uncond, cond])``).
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.experts: torch.Tensor | None = None
        self.runs: torch.Tensor | None = None
        self.runs_are_all = False  # the runs are experts 0..K-1 in order: stacks used as they are
        self.group = 0
        self._on: dict[tuple, torch.Tensor] = {}

    def set(self, experts: list[int] | torch.Tensor | None) -> None:
        """Route row ``i`` to expert ``experts[i]`` (``None``: no expert, the base model).

        Raises:
            ValueError: an index outside ``[0, num_experts)``.
        """
        self._on = {}
        self.runs, self.group, self.runs_are_all = None, 0, False
        if experts is None:
            self.experts = None
            return
        idx = torch.as_tensor(experts, dtype=torch.long).flatten()
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_experts):
            raise ValueError(f"expert indices must be in [0, {self.num_experts}), got {idx.tolist()}")
        self.experts = idx
        starts = [0] + [i for i in range(1, len(idx)) if idx[i] != idx[i - 1]]
        lengths = {b - a for a, b in zip(starts, starts[1:] + [len(idx)])}
        if len(lengths) == 1:
            self.group, self.runs = lengths.pop(), idx[starts]
            self.runs_are_all = torch.equal(self.runs, torch.arange(self.num_experts))

    def set_grouped(self, rows_per_expert: int) -> None:
        """Rows expert after expert, ``rows_per_expert`` each, every expert once (training)."""
        self.set(torch.arange(self.num_experts).repeat_interleave(rows_per_expert))

    def indices(self, rows: int, device: torch.device) -> torch.Tensor:
        """The expert of each of ``rows`` layer-input rows, on ``device`` (cached per call)."""
        return self._cached("rows", rows, device, lambda: self.experts)

    def run_experts(self, repeats: int, device: torch.device) -> torch.Tensor:
        """The expert of each run, the routing repeated ``repeats`` times, on ``device``."""
        return self._cached("runs", repeats, device, lambda: self.runs)

    def _cached(self, kind: str, n: int, device, source) -> torch.Tensor:
        key = (kind, n, device)
        if key not in self._on:
            idx = source()
            if kind == "rows" and n != len(idx):
                if n % len(idx):
                    raise ValueError(f"a layer input of {n} rows cannot be routed by {len(idx)} expert indices")
                idx = idx.repeat(n // len(idx))
            elif kind == "runs":
                idx = idx.repeat(n)
            self._on[key] = idx.to(device)
        return self._on[key]


class StackedLoRALinear(nn.Module):
    """``base(x) + scaling[k] * B[k] @ A[k] @ x`` for each row's expert ``k``.

    Args:
        base: the frozen ``nn.Linear`` (in -> out).
        lora_A: (K, r, in) initial down-projections (copied into a trainable fp32 parameter).
        lora_B: (K, out, r) initial up-projections.
        scaling: (K,) ``lora_alpha / r`` of each expert.
        route: the :class:`Route` every layer of the model shares.

    Shapes: ``x`` is (rows, ..., in) with rows a whole multiple of the routed rows; the result
    has ``base(x)``'s shape and dtype.
    """

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: torch.Tensor, route: Route):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(lora_A.detach().float().clone())
        self.lora_B = nn.Parameter(lora_B.detach().float().clone())
        self.register_buffer("scaling", scaling.detach().float().clone(), persistent=False)
        self.route = route

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        route = self.route
        if route.experts is None:
            return out
        rows = x.shape[0]
        flat = x.reshape(rows, -1, x.shape[-1]).to(self.lora_A.dtype)  # (rows, L, in)
        A, B, scale = self.lora_A, self.lora_B, self.scaling
        routed = len(route.experts)
        if route.group and rows % routed == 0:  # runs of `group` rows, one expert each
            repeats = rows // routed
            runs = route.run_experts(repeats, x.device)
            if repeats == 1 and len(runs) == A.shape[0] and route.runs_are_all:
                A_r, B_r, s_r = A, B, scale  # training: every expert once, in order (no gather)
            else:
                A_r, B_r, s_r = A[runs], B[runs], scale[runs]
            n = len(runs)
            flat = flat.reshape(n, route.group * flat.shape[1], -1)  # (runs, group*L, in)
        else:
            idx = route.indices(rows, x.device)
            A_r, B_r, s_r = A[idx], B[idx], scale[idx]
            n = rows
        h = torch.bmm(flat, A_r.transpose(1, 2))  # (n, M, r)
        h = h * s_r.to(h.dtype).view(n, 1, 1)  # the scaling on the rank-r activations (small)
        if h.dtype == out.dtype:  # out + h @ B^T in one kernel
            return torch.baddbmm(out.reshape(n, h.shape[1], -1), h, B_r.transpose(1, 2)).reshape(out.shape)
        return out + torch.bmm(h, B_r.transpose(1, 2)).reshape(out.shape).to(out.dtype)  # e.g. an fp16 base without autocast


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


class StackedLoRA:
    """The stacked LoRA layers of ``K`` experts put into a model in place of its peft LoRA
    layers (:meth:`from_peft`); :meth:`remove` puts the peft layers back.

    Attributes:
        adapters: the peft adapter name of each expert, in stack order.
        layers: ``{module name: StackedLoRALinear}``.
        route: the shared :class:`Route`.
    """

    def __init__(self, model: nn.Module, adapters: list[str], layers: dict[str, StackedLoRALinear], originals: dict[str, nn.Module], route: Route):
        self.model, self.adapters, self.layers, self._originals, self.route = model, list(adapters), layers, originals, route

    @classmethod
    def from_peft(cls, model: nn.Module, adapters: list[str]) -> "StackedLoRA":
        """Replace every peft LoRA ``Linear`` of ``model`` that carries all of ``adapters`` by a
        :class:`StackedLoRALinear` initialised from those adapters' weights.

        Raises:
            ValueError: no adapters, a LoRA layer that is not a ``Linear``, a DoRA adapter, or
                an adapter with dropout (each expert's rows would need their own dropout draws).
        """
        from peft.tuners.lora import LoraLayer

        if not adapters:
            raise ValueError("no adapters to stack")
        route = Route(len(adapters))
        layers, originals = {}, {}
        for name, module in list(model.named_modules()):
            if not isinstance(module, LoraLayer) or not all(a in module.lora_A for a in adapters):
                continue
            base = module.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{name}: stacked LoRA wraps nn.Linear layers, not {type(base).__name__}")
            for a in adapters:
                if getattr(module, "use_dora", {}).get(a):
                    raise ValueError(f"{name}: adapter {a} is a DoRA adapter; stacked experts are plain LoRA")
                dropout = module.lora_dropout[a]
                if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                    raise ValueError(f"{name}: adapter {a} has LoRA dropout {dropout.p}; stacked experts need none")
            A = torch.stack([module.lora_A[a].weight.detach() for a in adapters])
            B = torch.stack([module.lora_B[a].weight.detach() for a in adapters])
            scaling = torch.tensor([float(module.scaling[a]) for a in adapters])
            layer = StackedLoRALinear(base, A, B, scaling, route).to(A.device)
            parent, child = _parent(model, name)
            setattr(parent, child, layer)
            layers[name], originals[name] = layer, module
        if not layers:
            raise ValueError(f"the model has no LoRA layer carrying the adapters {adapters}")
        return cls(model, adapters, layers, originals, route)

    def parameters(self) -> list[nn.Parameter]:
        """The stacked parameters, ``lora_A`` then ``lora_B`` of each layer in model order."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each expert's slices into its peft adapter (``lora_A[adapter].weight`` ...), in
        the adapter's dtype, so that peft and diffusers save or use it as a lone expert."""
        for name, layer in self.layers.items():
            peft_layer = self._originals[name]
            for k, adapter in enumerate(self.adapters):
                peft_layer.lora_A[adapter].weight.copy_(layer.lora_A[k])
                peft_layer.lora_B[adapter].weight.copy_(layer.lora_B[k])

    def remove(self) -> None:
        """Put the peft LoRA layers back (without writing the stacked weights into them)."""
        for name, peft_layer in self._originals.items():
            parent, child = _parent(self.model, name)
            setattr(parent, child, peft_layer)
        self.layers = {}


@contextlib.contextmanager
def stacked_lora(model: nn.Module, adapters: list[str], *, write_back: bool = True) -> Iterator[StackedLoRA]:
    """:meth:`StackedLoRA.from_peft` for the ``with`` block; on leaving it the trained weights
    go back into the peft adapters (``write_back``) and the peft layers back into the model,
    also when the block raises."""
    stack = StackedLoRA.from_peft(model, adapters)
    try:
        yield stack
    finally:
        if write_back:
            stack.write_back()
        stack.remove()


@torch.no_grad()
def clip_grad_norm_per_expert(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of stacked parameters (K, ...) per expert: expert ``k``'s slices
    ``p.grad[k]`` of all ``params`` are scaled together so that their joint L2 norm is at most
    ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` clips one expert's parameters
    (coefficient ``max_norm / (norm + 1e-6)``, at most 1). No host sync.

    Returns:
        (K,) the norms before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    squares = torch.stack([g.float().pow(2).flatten(1).sum(1) for g in grads])  # (tensors, K)
    norms = squares.sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, [coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype) for g in grads])
    return norms


class StackedAdafactor(torch.optim.Optimizer):
    """``transformers.Adafactor`` (fixed ``lr``: ``relative_step=False``, ``scale_parameter=False``,
    no first moment) over stacked parameters (K, rows, cols), exact per expert, in a few
    kernels per step.

    Adafactor factors the second moment of a matrix into row and column statistics and clips
    its update by the update's RMS. Over a stack both are taken per leading slice, so that
    expert ``k``'s update equals that of its own ``transformers.Adafactor`` (up to float
    rounding). The step is batched: the parameters of each shape are stacked once more
    (P, K, rows, cols) and updated together, so the kernels per step grow with the number of
    distinct shapes, not with the number of parameters (transformers' implementation runs its
    ~15 operators for each parameter in a Python loop). fp16/bf16 parameters are updated in an
    fp32 copy and rounded once, as transformers does (the stacked layers hold fp32 anyway).

    Args:
        params: (K, rows, cols) parameters (or param groups).
        lr: the step size (a scheduler may change the groups' ``lr``).
        eps: ``(eps1, eps2)``: ``eps1`` is added to the squared gradient; ``eps2`` only bounds
            transformers' parameter scale, which is off here.
        clip_threshold: the RMS the update is clipped to (per slice).
        decay_rate: the second moment's decay exponent (``beta2_t = 1 - t^decay_rate``).
        weight_decay: decoupled decay, ``p -= weight_decay * lr * p``.

    Raises:
        ValueError: a parameter that is not 3-D.
    """

    def __init__(self, params, lr: float, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate, "weight_decay": weight_decay})
        for group in self.param_groups:
            for q in group["params"]:
                if q.dim() != 3:
                    raise ValueError(f"StackedAdafactor takes stacked (K, rows, cols) parameters, got shape {tuple(q.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            buckets: dict[tuple, list] = {}
            for q in group["params"]:
                if q.grad is None:
                    continue
                state = self.state[q]
                if not state:
                    state["step"] = 0
                    state["exp_avg_sq_row"] = torch.zeros(q.shape[:-1], device=q.device, dtype=torch.float32)
                    state["exp_avg_sq_col"] = torch.zeros(q.shape[:-2] + q.shape[-1:], device=q.device, dtype=torch.float32)
                state["step"] += 1
                buckets.setdefault((tuple(q.shape), q.device, q.dtype, state["step"]), []).append(q)
            for (_, _, _, step), params in buckets.items():
                self._update(group, params, step)
        return loss

    def _update(self, group: dict, params: list, step: int) -> None:
        """One Adafactor step of ``params`` (P tensors of one shape, all at ``step``), batched."""
        grads = torch.stack([q.grad for q in params]).float()  # (P, K, rows, cols)
        rows = [self.state[q]["exp_avg_sq_row"] for q in params]
        cols = [self.state[q]["exp_avg_sq_col"] for q in params]
        row, col = torch.stack(rows), torch.stack(cols)  # (P, K, rows), (P, K, cols)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grads.square().add_(group["eps"][0])
        row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
        torch._foreach_copy_(rows, list(row.unbind(0)))
        torch._foreach_copy_(cols, list(col.unbind(0)))
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        update = r_factor.mul(col.unsqueeze(-2).rsqrt()).mul_(grads)
        rms = update.flatten(2).norm(2, dim=-1) / math.sqrt(update[0, 0].numel())  # (P, K): per expert slice
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0)[..., None, None]).mul_(group["lr"])
        low = params[0].dtype in (torch.float16, torch.bfloat16)  # as transformers: update an fp32 copy, round once
        targets = [q.float() for q in params] if low else params
        if group["weight_decay"]:
            torch._foreach_add_(targets, targets, alpha=-group["weight_decay"] * group["lr"])
        torch._foreach_sub_(targets, list(update.unbind(0)))
        if low:
            torch._foreach_copy_(params, targets)


def make_stacked_optimizer(params: list[nn.Parameter], config, device: str):
    """The optimizer of :func:`experts.optim.make_optimizer` for stacked parameters: Adafactor
    per slice (:class:`StackedAdafactor`), AdamW with ``foreach`` (``fused`` on CUDA), or 8-bit
    AdamW (its quantisation blocks span experts: close to, not equal to, separate runs)."""
    from experts.optim import adamw_class

    lr = config.effective_learning_rate
    if config.optimizer == "adafactor":
        return StackedAdafactor(params, lr=lr)
    cls = adamw_class(config)
    kwargs = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if cls is torch.optim.AdamW:
        kwargs.update(fused=True) if str(device).startswith("cuda") else kwargs.update(foreach=True)
    return cls(params, **kwargs)


#: The most experts an automatic batch holds (``suti generate --resident-workers`` without
#: ``--expert-batch-size``).
MAX_AUTO_EXPERTS = 16


def experts_that_fit(free_bytes: int, bytes_per_expert: int, *, reserve: float = 0.15, most: int = MAX_AUTO_EXPERTS) -> int:
    """How many stacked experts fit in ``free_bytes`` of accelerator memory when each adds
    ``bytes_per_expert`` (its training rows' activations and gradients, its LoRA weights and
    optimizer state), keeping ``reserve`` of the free memory for sampling and fragmentation:
    ``floor(free * (1 - reserve) / per_expert)``, from 1 to ``most``."""
    if bytes_per_expert <= 0:
        return 1
    return int(max(1, min(most, free_bytes * (1.0 - reserve) // bytes_per_expert)))


def measure_bytes_per_expert(pipe, config, device: str) -> int:
    """The accelerator memory one more stacked expert takes: the peak of a LoRA training step
    on one expert's rows (``batch_size``, twice with prior preservation) at ``config``'s
    resolution, above the memory held before it (``torch.cuda.max_memory_allocated``). 0 on a
    device that is not CUDA. The step runs on a throwaway adapter, removed afterwards."""
    if not str(device).startswith("cuda"):
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        probe_training_step(pipe, config, device)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    finally:
        torch.cuda.empty_cache()


def probe_training_step(pipe, config, device: str) -> None:
    """One LoRA training step (forward and backward, no optimizer) of any family's denoiser
    (:func:`suti.denoisers.denoiser_for`) on one expert's rows at ``config``'s resolution, on a
    throwaway adapter ``_memory_probe`` that is removed afterwards (gradients cleared)."""
    from experts.train import add_lora, mixed_precision
    from suti.conditioning import encode_prompt
    from suti.denoisers import denoiser_for
    from suti.models import default_resolution

    denoiser = denoiser_for(pipe)
    module = denoiser.module
    resolution = config.resolution or default_resolution(config.model)
    rows = config.batch_size * (2 if config.prior_preservation else 1)
    latent = resolution // pipe.vae_scale_factor
    with torch.no_grad():  # the training step's conditioning (cached there too)
        cond = encode_prompt(pipe, ["a photo of an object"] * rows, resolution=resolution,
                             max_sequence_length=config.max_sequence_length).to(device)
    add_lora(pipe, config, adapter_name="_memory_probe")
    try:
        for name, p in module.named_parameters():
            if "_memory_probe" in name:
                p.requires_grad_(True)
        x = torch.randn(rows, pipe.vae.config.latent_channels, latent, latent, device=device, dtype=module.dtype)
        with mixed_precision(config, device).autocast():
            denoiser(x, torch.full((rows,), 500.0, device=device), cond).float().pow(2).mean().backward()
    finally:
        module.delete_adapters(["_memory_probe"])
        module.zero_grad(set_to_none=True)
