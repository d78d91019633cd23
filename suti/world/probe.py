"""An attribute probe for the synthetic world: subject fidelity measured by reading the image.

A small CNN (32x32 input, any image size is resized; four stages of 3x3 conv + BatchNorm + ReLU
with 32/64/128/128 channels and 2x2 max-pooling between them, average+max pooled) with a
multi-head classifier predicting a scene's identity attributes - ``class_name``, ``body_color``,
``pattern``, ``pattern_color``, ``part``, ``aspect`` - and its prompt attributes ``context``,
``accessory`` and ``style``. Identity and prompt heads sit on two separate branches of a shared
trunk, so the identity branch can stay invariant to context, accessory and style.

It is trained (:mod:`suti.world.training.probe`, ``python -m suti.world.training.probe``) on
scenes (half of them edited) of the train subjects of the seed-0 world of 6144 subjects -
thousands of subjects, so the heads read attributes instead of memorising subjects - and
evaluated on held-out subjects of the 1024-subject world (held out in every smaller seed-0
world too, the default 24-subject one included). This module is the network, its loading and
its use (:class:`Probe`, :func:`load_probe`, :func:`evaluate_probe`).

Labels follow what the image *shows*: with a colour edit the body colour is the displayed one;
in a sketch colours cannot be seen, so the colour losses are masked there and
:meth:`Probe.identity_accuracy` does not check colours of images it reads as sketches.
``part`` is predicted jointly with the class (18 ways) and read within the predicted class.

The identity embedding (:meth:`Probe.identity_embedding`, DINO's role in the metrics) is the
L2-normalised output of a projection head on the identity branch, trained with a supervised
contrastive loss over subjects (two scenes per subject in each batch; a colour-edited scene
only pairs with scenes of the same displayed colour). ``benchmarks/world_clip_probe.py``
compares it with the raw identity-branch features and the head probabilities.

Usage::

    from suti.world.probe import load_probe

    probe = load_probe()
    probe.predict(images)                 # [{"class_name": "robot", "body_color": "red", ...}]
    probe.identity_accuracy(images, subject)
    probe.attribute_accuracy(images, {"context": "beach", "accessory": "hat"})
    probe.identity_embedding(images)      # (N, 64), L2-normalised
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from suti.errors import InputError, ModelLoadError
from suti.world.toy_clip import IMAGE_SIZE, _weights_folder, images_to_tensor

#: Heads of the probe: output name -> labels (``None``: no pattern colour/accessory/style).
#: ``part`` labels are ``"class_name/part"``.
IDENTITY_HEADS = ("class_name", "body_color", "pattern", "pattern_color", "part", "aspect")
PROMPT_HEADS = ("context", "accessory", "style")
#: Attributes :meth:`Probe.identity_accuracy` checks by default (``pattern_color`` optional).
IDENTITY_ATTRS = ("class_name", "body_color", "pattern", "part", "aspect")
COLOR_ATTRS = ("body_color", "pattern_color")
_ALIASES = {"class": "class_name", "color": "body_color"}


def head_labels() -> dict[str, list]:
    """Label list of every head, in output order (:func:`suti.world.vocab.attribute_labels`,
    with ``class`` and ``color`` named ``class_name`` and ``body_color`` as on a subject)."""
    from suti.world.vocab import attribute_labels

    return {_ALIASES.get(k, k): v for k, v in attribute_labels().items()}


DEFAULT_CONFIG: dict = {"stages": [[32], [64], [128], [128]], "branch_dim": 128, "embed_dim": 64,
                        "image_size": IMAGE_SIZE}


def build_probe_net(config: dict):
    """A randomly initialised probe network (``ProbeNet``, a ``torch.nn.Module``) of ``config``
    (:data:`DEFAULT_CONFIG`'s keys: conv ``stages``, ``branch_dim``, ``embed_dim``)."""
    import torch
    import torch.nn as nn

    def block(i: int, o: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o),
                             nn.ReLU(inplace=True))

    class ProbeNet(nn.Module):
        """Shared conv trunk -> identity branch (heads + embedding) and prompt branch (heads).

        ``forward(x (B,3,32,32))`` returns a dict: one logits tensor ``(B, n_labels)`` per head,
        ``"identity"`` (B, branch_dim) features and ``"embedding"`` (B, embed_dim) un-normalised.
        """

        def __init__(self, stages, branch_dim, embed_dim, **_):
            super().__init__()
            layers, width = [], 3
            for k, stage in enumerate(stages):  # 3x3 conv blocks, 2x2 max-pool between stages
                if k:
                    layers.append(nn.MaxPool2d(2))
                for channels in stage:
                    layers.append(block(width, channels, 1))
                    width = channels
            self.trunk = nn.Sequential(*layers)
            feat = 2 * width  # average + max pooled
            self.identity = nn.Sequential(nn.Linear(feat, branch_dim), nn.BatchNorm1d(branch_dim),
                                          nn.ReLU(inplace=True))
            self.prompt = nn.Sequential(nn.Linear(feat, branch_dim), nn.BatchNorm1d(branch_dim),
                                        nn.ReLU(inplace=True))
            labels = head_labels()
            self.heads = nn.ModuleDict({h: nn.Linear(branch_dim, len(labels[h]))
                                        for h in (*IDENTITY_HEADS, *PROMPT_HEADS)})
            self.project = nn.Sequential(nn.Linear(branch_dim, branch_dim), nn.ReLU(inplace=True),
                                         nn.Linear(branch_dim, embed_dim))

        def forward(self, x):
            f = self.trunk(x)  # (B, C, 4, 4)
            f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)  # (B, 2C)
            ident, prompt = self.identity(f), self.prompt(f)  # (B, branch_dim) each
            out = {h: self.heads[h](ident) for h in IDENTITY_HEADS}
            out.update({h: self.heads[h](prompt) for h in PROMPT_HEADS})
            out["identity"] = ident
            out["embedding"] = self.project(ident)
            return out

    return ProbeNet(**config)


class Probe:
    """A trained attribute probe (wraps the network; everything runs under ``no_grad``)."""

    def __init__(self, net, config: dict, meta: dict | None = None):
        self.net = net.eval()
        self.config = config
        self.meta = meta or {}
        self.image_size = int(config.get("image_size", IMAGE_SIZE))

    def _forward(self, images, batch_size: int = 256) -> dict:
        import torch

        if not len(images):
            raise InputError("the probe needs at least one image")
        outs: list[dict] = []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                outs.append(self.net(images_to_tensor(images[i:i + batch_size], self.image_size)))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    @staticmethod
    def _decode(out: dict) -> list[dict]:
        import torch

        from suti.world.spec import CLASSES

        labels = head_labels()
        n = out["class_name"].shape[0]
        idx = {h: out[h].argmax(1).tolist() for h in (*IDENTITY_HEADS, *PROMPT_HEADS)}
        part_logits = out["part"].view(n, len(labels["class_name"]), -1)  # (N, classes, 3)
        part_idx = part_logits[torch.arange(n), torch.tensor(idx["class_name"])].argmax(1)
        rows = []
        for i in range(n):
            row = {h: labels[h][idx[h][i]] for h in (*IDENTITY_HEADS, *PROMPT_HEADS)}
            row["part"] = list(CLASSES[row["class_name"]].parts)[int(part_idx[i])]
            rows.append(row)
        return rows

    def predict(self, images) -> list[dict]:
        """Read each image: ``[{class_name, body_color, pattern, pattern_color, part, aspect,
        context, accessory, style}]`` (``part`` is the part id within the predicted class;
        ``pattern_color``, ``accessory`` and ``style`` may be ``None``)."""
        return self._decode(self._forward(images))

    def identity_hits(self, images, subject, *, color: str | None = None,
                      attrs: tuple[str, ...] = IDENTITY_ATTRS) -> list[dict[str, bool]]:
        """Per image, ``{attribute: matches subject}`` for each of ``attrs``, from one batched
        forward pass (colours are left out on images the probe reads as sketches: unknowable
        there). ``color``: the expected body colour after a colour edit."""
        expected = {"class_name": subject.class_name, "body_color": color or subject.body_color,
                    "pattern": subject.pattern, "pattern_color": subject.pattern_color,
                    "part": subject.part, "aspect": subject.aspect}
        return [{a: row[a] == expected[a] for a in attrs
                 if not (row["style"] == "sketch" and a in COLOR_ATTRS)}
                for row in self.predict(images)]

    def identity_accuracy(self, images, subject, *, color: str | None = None,
                          attrs: tuple[str, ...] = IDENTITY_ATTRS) -> float:
        """Fraction of ``images`` whose predicted identity attributes all match ``subject``.

        Args:
            images: PIL images, e.g. generations for the subject.
            subject: the :class:`~suti.world.spec.Subject` they should show.
            color: the expected body colour when the prompt asked for a colour edit.
            attrs: attributes to check (default class, body colour, pattern, part, aspect; add
                ``"pattern_color"`` for a stricter check).

        Colours are not checked on images the probe reads as sketches (unknowable there).
        """
        return float(np.mean([all(h.values()) for h in self.identity_hits(images, subject, color=color, attrs=attrs)]))

    def identity_attribute_score(self, images, subject, *, color: str | None = None,
                                 attrs: tuple[str, ...] = IDENTITY_ATTRS) -> float:
        """Mean fraction of ``subject``'s identity attributes (class, body colour, pattern,
        part, aspect) that the probe reads correctly, over ``images``: a graded companion of
        :meth:`identity_accuracy` (which needs all of them at once) for weak generators.
        Arguments as for :meth:`identity_accuracy`."""
        return float(np.mean([np.mean(list(h.values())) for h in self.identity_hits(images, subject, color=color, attrs=attrs)]))

    def attribute_accuracy(self, images, expected: dict) -> dict[str, float]:
        """Per-attribute accuracy of ``images`` against ``expected`` (attribute -> value).

        Keys are head names (``class_name``, ``body_color``, ``pattern``, ``pattern_color``,
        ``part``, ``aspect``, ``context``, ``accessory``, ``style``; ``class`` and ``color`` are
        accepted aliases); ``None`` values mean "no accessory"/"no style"/"plain". A colour
        attribute is skipped (not counted) on images read as sketches; if every image is, its
        accuracy is ``nan``.
        """
        expected = {_ALIASES.get(k, k): v for k, v in expected.items()}
        unknown = set(expected) - set(head_labels())
        if unknown:
            raise InputError(f"unknown probe attribute(s) {sorted(unknown)}; "
                             f"known: {', '.join(head_labels())}")
        rows = self.predict(images)
        result = {}
        for key, value in expected.items():
            hits = [row[key] == value for row in rows
                    if not (key in COLOR_ATTRS and row["style"] == "sketch")]
            result[key] = float(np.mean(hits)) if hits else float("nan")
        return result

    def identity_embedding(self, images):
        """``(N, D)`` L2-normalised identity embeddings (the supervised-contrastive head)."""
        import torch.nn.functional as F

        return F.normalize(self._forward(images)["embedding"].float(), dim=1)

    def identity_features(self, images):
        """``(N, branch_dim)`` L2-normalised identity-branch features (before the heads)."""
        import torch.nn.functional as F

        return F.normalize(self._forward(images)["identity"].float(), dim=1)

    def parameter_count(self) -> int:
        """Number of parameters of the network."""
        return sum(p.numel() for p in self.net.parameters())


# --------------------------------------------------------------------------- evaluation


def evaluate_probe(probe: Probe, subjects, *, n_subjects: int = 64, per_subject: int = 4,
                   seed: int = 4321, edit_prob: float = 0.5) -> dict:
    """Held-out checks: per-head accuracy on edited scenes, identity accuracy on unedited
    scenes, and nearest-neighbour subject retrieval with three embeddings.

    Returns ``{"attributes": {head: acc}, "chance": {head: 1/labels}, "identity_accuracy",
    "retrieval": {"embedding", "identity_features", "head_probs", "chance"}}``.
    """
    import torch
    import torch.nn.functional as F

    from suti.world.render import sample_scene

    rng = np.random.default_rng(seed)
    chosen = [subjects[int(i)] for i in rng.permutation(len(subjects))[:n_subjects]]
    labels = head_labels()
    heads = (*IDENTITY_HEADS, *PROMPT_HEADS)
    # per-head accuracy on edited scenes
    images, truths = [], []
    for s in chosen:
        for _ in range(per_subject):
            img, _, meta = sample_scene(s, rng, size=IMAGE_SIZE, edit_prob=edit_prob)
            images.append(img)
            values = {"class_name": s.class_name, "body_color": meta["color"],
                      "pattern": s.pattern, "pattern_color": s.pattern_color, "part": s.part,
                      "aspect": s.aspect, "context": meta["context"],
                      "accessory": meta["accessory"], "style": meta["style"]}
            truths.append(values)
    rows = probe.predict(images)
    attrs = {}
    for h in heads:
        hits = [r[h] == t[h] for r, t in zip(rows, truths)
                if not (h in COLOR_ATTRS and t["style"] == "sketch")]
        attrs[h] = float(np.mean(hits))
    chance = {h: 1.0 / len(labels[h]) for h in heads}
    chance["part"] = 1.0 / 3  # within the class
    # identity accuracy and retrieval on unedited scenes (reference photos)
    plain = [[sample_scene(s, rng, size=IMAGE_SIZE)[0] for _ in range(per_subject)]
             for s in chosen]
    ident = float(np.mean([probe.identity_accuracy(imgs, s) for imgs, s in zip(plain, chosen)]))
    ident_pc = float(np.mean([probe.identity_accuracy(imgs, s, attrs=(*IDENTITY_ATTRS,
                                                                        "pattern_color"))
                              for imgs, s in zip(plain, chosen)]))
    flat = [im for imgs in plain for im in imgs]
    owner = torch.arange(len(chosen)).repeat_interleave(per_subject)
    out = probe._forward(flat)
    probs = torch.cat([F.softmax(out[h], 1) for h in IDENTITY_HEADS], 1)
    embs = {"embedding": F.normalize(out["embedding"], dim=1),
            "identity_features": F.normalize(out["identity"], dim=1),
            "head_probs": F.normalize(probs, dim=1)}
    retrieval = {name: nn_retrieval(e, owner) for name, e in embs.items()}
    retrieval["chance"] = (per_subject - 1) / (len(flat) - 1)
    return {"attributes": attrs, "chance": chance, "identity_accuracy": ident,
            "identity_accuracy_with_pattern_color": ident_pc, "retrieval": retrieval,
            "n_subjects": len(chosen), "per_subject": per_subject}


def nn_retrieval(emb, owner) -> float:
    """Leave-one-out nearest-neighbour accuracy: fraction of rows of ``emb`` (N, D, normalised)
    whose most similar other row has the same ``owner`` (N,) label."""

    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return float((owner[sim.argmax(1)] == owner).float().mean())


# --------------------------------------------------------------------------- loading


def _load_from(folder: Path) -> Probe:
    from safetensors.torch import load_file

    from suti.weights import check_safetensors, loading, read_json_file

    meta = read_json_file(folder / "probe.json")
    check_safetensors(folder / "probe.safetensors")
    with loading(folder / "probe.safetensors"):
        net = build_probe_net(meta["config"])
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in load_file(str(folder / "probe.safetensors")).items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{folder}/probe.safetensors does not match probe.json "
                             f"({str(exc)[:200]})") from None
    for p in net.parameters():
        p.requires_grad_(False)
    return Probe(net, meta["config"], meta)


def load_probe(weights_dir: str | Path | None = None) -> Probe:
    """Load the attribute probe (eval mode, frozen).

    Weights come from ``weights_dir`` when given, else the shipped ``suti/world/weights/``; when
    those are missing they are trained once into ``<suti cache>/world/probe`` (a logged warning,
    several minutes).
    """
    folder = _weights_folder("probe", ("probe.safetensors", "probe.json"),
                             "suti.world.training.probe:pretrain_probe", weights_dir)
    return _load_from(folder)


@lru_cache(maxsize=1)
def default_probe() -> Probe:
    """The shared :func:`load_probe` instance used by the module-level helpers."""
    return load_probe()


def predict(images) -> list[dict]:
    """:meth:`Probe.predict` with the default probe."""
    return default_probe().predict(images)


def identity_accuracy(images, subject, **kwargs) -> float:
    """:meth:`Probe.identity_accuracy` with the default probe."""
    return default_probe().identity_accuracy(images, subject, **kwargs)


def attribute_accuracy(images, expected: dict) -> dict[str, float]:
    """:meth:`Probe.attribute_accuracy` with the default probe."""
    return default_probe().attribute_accuracy(images, expected)


def identity_embedding(images):
    """:meth:`Probe.identity_embedding` with the default probe: ``(N, D)`` normalised."""
    return default_probe().identity_embedding(images)
