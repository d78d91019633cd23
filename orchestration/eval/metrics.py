"""DreamBench metrics on embeddings, as the public re-implementations compute them.

All embeddings are L2-normalised rows. CLIP-I and DINO: mean cosine between a generated image
and every real image of the subject. CLIP-T: cosine between a generated image and its prompt
(identifier replaced by the class noun). PRES (prior preservation, lower is better): mean DINO
similarity of images generated for the bare class prompt to the real subject images. DIV
(diversity): 1 - mean pairwise DINO similarity among images generated for the same prompt
(embedding-based, not LPIPS; stated in the output).
"""

from __future__ import annotations

import torch


def mean_cosine_to_set(x: torch.Tensor, ref: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """(N, D), (M, D) -> (N,) mean cosine of each row of ``x`` to all rows of ``ref``.

    With ``exclude_self`` (x is ref, N == M) each row is compared to the others only.
    """
    sim = x @ ref.T  # (N, M)
    if exclude_self:
        n = sim.shape[0]
        if n < 2:
            return torch.full((n,), float("nan"))
        return (sim.sum(1) - sim.diagonal()) / (n - 1)
    return sim.mean(1)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N,) cosine of matched rows."""
    return (a * b).sum(-1)


def diversity(x: torch.Tensor) -> float:
    """1 - mean pairwise cosine among rows of ``x`` (NaN for fewer than 2)."""
    if len(x) < 2:
        return float("nan")
    return float(1 - mean_cosine_to_set(x, x, exclude_self=True).mean())
