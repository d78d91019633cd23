"""A small CLIP for the synthetic world: makes CLIP-I / CLIP-T measurable offline.

The model is an ordinary :class:`open_clip.model.CLIP` built from a custom config
(``"suti-toy-clip"``, :data:`DEFAULT_CONFIG`): a ModifiedResNet (CLIP-RN style) vision tower
on 32x32 images and a causal text transformer over the standard CLIP BPE tokens
(:class:`open_clip.tokenizer.SimpleTokenizer`, context length 32, the real 49408-token
vocabulary). Any image size is accepted: images are centre-cropped to a square and resized to
32 px with LANCZOS (the world itself renders 32 px scenes by LANCZOS-downsampling 4x sprites).

It is pretrained contrastively (symmetric InfoNCE, learnable temperature) on scenes of the
*train* subjects of the training world (:data:`TRAIN_WORLD_SUBJECTS` subjects, seed
:data:`TRAIN_WORLD_SEED`), half of them edited (colour change, accessory, style), rendered into
a :class:`SceneBuffer` (each step renders 64 fresh scenes and reuses stored ones, with flips),
each drawn with a fresh caption of one of several forms:

* ``full``: the world's DreamBench caption (``"a sketch of a red striped robot in the snow"``),
* ``class``: class noun only (``"a robot wearing a hat on the beach"``) as DreamBench prompts
  are worded, naming the colour only for a colour edit,
* ``detailed``: proportions, part and pattern colour too,
* ``nocontext``: the full caption without its context phrase.

Captions that leave an attribute out are true of many images, so the contrastive targets are
*multi-positive*: caption ``j`` counts as a positive of image ``i`` whenever everything caption
``j`` states holds for image ``i`` (colour counts as unknowable in sketches). Held-out subjects
of that world (all held-out subjects of ``make_world(n, seed=0)`` for ``n <= 1024``, the
default 24-subject world included) are never seen.

Usage::

    from suti.world.toy_clip import load_toy_clip, encode_images, encode_texts

    model, preprocess, tokenizer = load_toy_clip()
    img = encode_images(model, images)          # (N, D), L2-normalised
    txt = encode_texts(model, ["a red ball on the beach"])  # (1, D)
"""

from __future__ import annotations

import json
import logging
import math
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from suti import storage
from suti.errors import ModelLoadError

log = logging.getLogger(__name__)

#: Where the shipped weights live (``toy_clip.safetensors`` + ``toy_clip.json``, ``probe.*``).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: The world whose *train* split the toy models learn from (its held-out split is never seen).
TRAIN_WORLD_SUBJECTS = 1024
TRAIN_WORLD_SEED = 0
#: Side of the images the toy models see.
IMAGE_SIZE = 32

MODEL_NAME = "suti-toy-clip"
#: open_clip model config (``CLIP(embed_dim, vision_cfg, text_cfg)``) of the toy CLIP.
DEFAULT_CONFIG: dict = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16,
                   "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4,
                 "layers": 3},
}
#: Pixel normalisation: [0, 255] -> [-1, 1] (the same scale as :func:`suti.images.to_tensor`).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- images and text


def resize_to(img: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB, centre-cropped to a square and resized to ``size`` (LANCZOS) when needed."""
    img = img.convert("RGB")
    if img.width != img.height:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.width != size:
        img = img.resize((size, size), Image.LANCZOS)
    return img


def images_to_tensor(images, size: int = IMAGE_SIZE):
    """PIL images (any size/mode) -> float tensor ``(N, 3, size, size)`` in [-1, 1]."""
    import torch

    arr = np.stack([np.asarray(resize_to(im, size), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0).contiguous()


class Preprocess:
    """The toy CLIP's image transform: PIL image -> ``(3, 32, 32)`` float tensor in [-1, 1]."""

    def __init__(self, size: int = IMAGE_SIZE):
        self.size = size

    def __call__(self, img: Image.Image):
        return images_to_tensor([img], self.size)[0]

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, resample=LANCZOS, mean={IMAGE_MEAN}, std={IMAGE_STD})"


@lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 32):
    """The standard CLIP BPE tokenizer of open_clip (offline): ``tok(list[str]) -> (N, L) long``."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def build_toy_clip(config: dict | None = None):
    """A randomly initialised toy CLIP (an ``open_clip.model.CLIP``) from an open_clip config."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = config or DEFAULT_CONFIG
    return CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                CLIPTextCfg(**cfg["text_cfg"]))


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", IMAGE_SIZE)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def encode_images(model, images, batch_size: int = 256):
    """Embed PIL images with a toy CLIP: ``(N, D)`` L2-normalised float32 tensor."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images_to_tensor(images[i:i + batch_size], _image_size(model))
            out.append(model.encode_image(x, normalize=True).float())
    return torch.cat(out) if out else torch.zeros(0, model.text_projection.shape[1])


def encode_texts(model, texts, tokenizer=None, batch_size: int = 512):
    """Embed strings with a toy CLIP: ``(N, D)`` L2-normalised float32 tensor."""
    import torch

    tokenizer = tokenizer or get_tokenizer(model.context_length)
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(model.encode_text(tokenizer(list(texts[i:i + batch_size])),
                                         normalize=True).float())
    return torch.cat(out) if out else torch.zeros(0, model.text_projection.shape[1])


# --------------------------------------------------------------------------- training data

#: Attribute fields of a scene, in the column order of :func:`scene_truth`.
FIELDS = ("class", "color", "pattern", "pattern_color", "part", "aspect", "context",
          "accessory", "style")


@lru_cache(maxsize=1)
def vocabularies() -> dict[str, list]:
    """Per-field label lists (``None`` is "no accessory"/"no style"/"no pattern colour")."""
    from suti.world.spec import ACCESSORIES, ASPECTS, CLASSES, COLORS, CONTEXTS, PATTERNS, STYLES

    return {
        "class": list(CLASSES),
        "color": list(COLORS),
        "pattern": list(PATTERNS),
        "pattern_color": [None, *COLORS],
        "part": [f"{c}/{p}" for c, spec in CLASSES.items() for p in spec.parts],
        "aspect": list(ASPECTS),
        "context": list(CONTEXTS),
        "accessory": [None, *ACCESSORIES],
        "style": [None, *STYLES],
    }


def scene_truth(subject, meta: dict) -> dict[str, object]:
    """The attribute values shown in a scene of ``subject`` (``meta`` from ``sample_scene``)."""
    return {"class": subject.class_name, "color": meta["color"], "pattern": subject.pattern,
            "pattern_color": subject.pattern_color,
            "part": f"{subject.class_name}/{subject.part}", "aspect": subject.aspect,
            "context": meta["context"], "accessory": meta["accessory"], "style": meta["style"]}


def _codes(values: dict) -> list[int]:
    voc = vocabularies()
    return [voc[f].index(values[f]) if f in values else -1 for f in FIELDS]


CAPTION_FORMS = {"full": 0.55, "class": 0.2, "detailed": 0.15, "nocontext": 0.1}


def scene_caption(subject, meta: dict, form: str) -> tuple[str, dict]:
    """A caption of one caption form and the attributes it states (field -> value).

    Attributes a caption leaves out are unconstrained, except accessory and style (naming none
    means there is none, as in :func:`suti.world.caption`) and, in ``full``/``detailed``
    captions, the pattern (the world omits the word for plain subjects).
    """
    from suti.world.spec import ACCESSORIES, CONTEXTS, STYLES

    truth = scene_truth(subject, meta)
    override = meta["color"] if meta.get("edit") == "attribute" else None
    stated = {"class": truth["class"], "accessory": truth["accessory"], "style": truth["style"]}
    if form == "class":
        noun = " ".join(w for w in (override, subject.class_noun) if w)
        if override:
            stated["color"] = override
    else:
        noun = subject.description(color=override, detailed=form == "detailed")
        stated.update(color=truth["color"], pattern=truth["pattern"])
        if form == "detailed":
            stated.update(pattern_color=truth["pattern_color"], part=truth["part"],
                          aspect=truth["aspect"])
    words = [STYLES[truth["style"]]] if truth["style"] else []
    words.append(("an " if noun[0] in "aeiou" else "a ") + noun)
    if truth["accessory"]:
        words.append(ACCESSORIES[truth["accessory"]])
    if form != "nocontext":
        words.append(CONTEXTS[truth["context"]].phrase)
        stated["context"] = truth["context"]
    return " ".join(words), stated


def positives(truth_codes, caption_codes):
    """``(B, B)`` bool: caption ``j`` holds for image ``i`` (all its stated fields match).

    ``truth_codes``/``caption_codes``: ``(B, F)`` int arrays over :data:`FIELDS`; a caption code
    ``-1`` is an unstated field, a truth code ``-2`` an unknowable one (colour in a sketch).
    """
    t = truth_codes[:, None, :]
    c = caption_codes[None, :, :]
    return ((c == -1) | (t == -2) | (c == t)).all(-1)


def training_world(num_subjects: int = TRAIN_WORLD_SUBJECTS):
    """The world the toy models are trained on (only its train split is used).

    Worlds of one seed extend each other with the same splits, so a bigger training world
    (the probe uses 6144 subjects) keeps every held-out subject of the smaller ones unseen.
    """
    from suti.world.spec import make_world

    return make_world(num_subjects, seed=TRAIN_WORLD_SEED)


class SceneBuffer:
    """Rendered training scenes kept for reuse, so training is not bound by rendering.

    Holds up to ``per_subject`` 32 px scenes (uint8) for each subject in a ring; :meth:`add`
    renders fresh scenes of random subjects (half of them edited, a fraction ``p64`` rendered at
    64 px and resized, as real inputs may be) and :meth:`sample` draws batches with random
    horizontal flips (a flip is a valid pose of every subject). Both the toy CLIP and the probe
    train from one: each step renders a few fresh scenes and samples a batch.
    """

    def __init__(self, subjects, seed: int, *, per_subject: int = 48, edit_prob: float = 0.5,
                 p64: float = 0.25):
        self.subjects = list(subjects)
        self.rng = np.random.default_rng([seed, 303])
        self.per_subject = per_subject
        self.edit_prob = edit_prob
        self.p64 = p64
        n = len(self.subjects)
        self.images = np.zeros((n, per_subject, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        self.meta: list[list] = [[None] * per_subject for _ in range(n)]
        self.count = np.zeros(n, int)
        self.rendered = 0

    def render_one(self, k: int) -> None:
        """Render a fresh scene of subject ``k`` into its ring."""
        from suti.world.render import sample_scene

        size = 64 if self.rng.random() < self.p64 else IMAGE_SIZE
        img, _, meta = sample_scene(self.subjects[k], self.rng, size=size,
                                    edit_prob=self.edit_prob)
        slot = self.count[k] % self.per_subject
        self.images[k, slot] = np.asarray(resize_to(img))
        self.meta[k][slot] = meta
        self.count[k] += 1
        self.rendered += 1

    def add(self, n: int) -> None:
        """Render ``n`` fresh scenes of random subjects."""
        for k in self.rng.integers(len(self.subjects), size=n):
            self.render_one(int(k))

    def fill(self, per_subject: int) -> None:
        """Render until every subject has at least ``per_subject`` scenes."""
        for k in range(len(self.subjects)):
            while self.count[k] < per_subject:
                self.render_one(k)

    def sample(self, n_subjects: int, views: int = 1):
        """``views`` distinct stored scenes of each of ``n_subjects`` distinct subjects.

        Returns ``(images (n_subjects * views, 3, 32, 32) float in [-1, 1], subject indices,
        metas)``, ordered view-major (all first views, then all second views...).
        """
        import torch

        ready = np.flatnonzero(self.count >= views)
        chosen = self.rng.choice(ready, size=min(n_subjects, len(ready)), replace=False)
        arrays, ks, metas = [], [], []
        slots = [self.rng.choice(min(self.count[k], self.per_subject), size=views,
                                 replace=False) for k in chosen]
        for v in range(views):
            for k, sl in zip(chosen, slots):
                arr = self.images[k, sl[v]]
                arrays.append(arr[:, ::-1] if self.rng.random() < 0.5 else arr)
                ks.append(int(k))
                metas.append(self.meta[k][sl[v]])
        x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays), np.float32))
        x = x.permute(0, 3, 1, 2).div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last), ks, metas


def clip_batch(buffer: SceneBuffer, batch_size: int, forms: dict[str, float] | None = None):
    """A contrastive batch from ``buffer`` (one scene each of ``batch_size`` subjects, each with
    a fresh random caption form): ``(images (B,3,32,32), captions, truth codes (B, F),
    caption codes (B, F))`` for :func:`positives`."""
    forms = forms or CAPTION_FORMS
    names, probs = list(forms), np.array(list(forms.values()), float)
    probs /= probs.sum()
    x, ks, metas = buffer.sample(batch_size, 1)
    texts, tcodes, ccodes = [], [], []
    for k, meta in zip(ks, metas):
        subject = buffer.subjects[k]
        form = names[int(buffer.rng.choice(len(names), p=probs))]
        text, stated = scene_caption(subject, meta, form)
        truth = _codes(scene_truth(subject, meta))
        if meta["style"] == "sketch":
            truth[FIELDS.index("color")] = truth[FIELDS.index("pattern_color")] = -2
        texts.append(text)
        tcodes.append(truth)
        ccodes.append(_codes(stated))
    return x, texts, np.array(tcodes), np.array(ccodes)


# --------------------------------------------------------------------------- evaluation


def retrieval_accuracy(model, subjects, n: int = 64, seed: int = 1234, edit_prob: float = 0.5,
                       tokenizer=None) -> dict[str, float]:
    """Caption retrieval among ``n`` scenes of ``n`` different subjects (one each).

    Each scene gets the world's caption (:func:`suti.world.caption`, edits included). Returns
    ``image_to_text`` / ``text_to_image`` top-1 accuracies and ``chance`` (= 1/n); a retrieved
    caption counts as right when its text equals the true caption.
    """
    from suti.world.render import sample_scene

    rng = np.random.default_rng(seed)
    chosen = [subjects[i] for i in rng.permutation(len(subjects))[:n]]
    scenes = [sample_scene(s, rng, size=IMAGE_SIZE, edit_prob=edit_prob) for s in chosen]
    img = encode_images(model, [im for im, _, _ in scenes])
    texts = [t for _, t, _ in scenes]
    txt = encode_texts(model, texts, tokenizer)
    sim = img @ txt.T  # (n images, n captions)
    i2t = [texts[int(j)] == texts[i] for i, j in enumerate(sim.argmax(1))]
    t2i = [texts[int(i)] == texts[j] for j, i in enumerate(sim.argmax(0))]
    return {"image_to_text": float(np.mean(i2t)), "text_to_image": float(np.mean(t2i)),
            "chance": 1.0 / len(chosen), "n": len(chosen)}


# --------------------------------------------------------------------------- pretraining


def _lr_factor(progress: float, warmup: float = 0.05) -> float:
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def pretrain_clip(out_dir: str | Path, *, seed: int = 0, minutes: float = 20.0,
                  steps: int = 500, batch_size: int = 256, fresh: int = 64, lr: float = 1e-3,
                  config: dict | None = None, progress: bool = True) -> dict:
    """Pretrain the toy CLIP on the training world; write ``toy_clip.safetensors`` + ``.json``.

    Training stops after ``steps`` steps or ``minutes`` of wall time, whichever comes first;
    the learning rate follows warm-up + cosine over that budget. Weights are saved in fp16
    (:func:`pack_state`). The defaults are those of the shipped weights (500 steps took 10 min
    on one shared CPU core).

    Args:
        out_dir: folder for ``toy_clip.safetensors`` and ``toy_clip.json`` (created).
        seed: seeds the initialisation and the scene stream.
        minutes: wall-time budget.
        steps: step budget.
        batch_size: scenes (and captions) per contrastive batch, of distinct subjects.
        fresh: scenes rendered into the :class:`SceneBuffer` per step (the rest is reuse).
        lr: peak AdamW learning rate.
        config: open_clip model config (default :data:`DEFAULT_CONFIG`).
        progress: log the loss every 50 steps and the final held-out retrieval.

    Returns:
        The metadata written to ``toy_clip.json`` (config, steps, time, held-out retrieval).
    """
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    cfg = json.loads(json.dumps(config or DEFAULT_CONFIG))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_toy_clip(cfg)
    model.train()
    tokenizer = get_tokenizer(cfg["text_cfg"]["context_length"])
    world = training_world()
    train, heldout = world.train_subjects, world.heldout_subjects
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    model = model.to(memory_format=torch.channels_last)
    budget = minutes * 60.0
    start = time.time()
    buffer = SceneBuffer(train, seed)
    buffer.fill(2)
    seen = torch.zeros(cfg["text_cfg"]["vocab_size"], dtype=torch.bool)  # token ids trained
    step, losses = 0, []
    while step < steps:
        frac = max(step / steps, (time.time() - start) / budget)
        if frac >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(frac)
        buffer.add(fresh)
        x, texts, tcodes, ccodes = clip_batch(buffer, batch_size)
        pos = torch.from_numpy(positives(tcodes, ccodes)).float()  # (B images, B captions)
        tokens = tokenizer(texts)  # (B, 32)
        seen[tokens.unique()] = True
        img, txt, scale = model(x, tokens)  # (B, D), (B, D), ()
        logits = scale * img @ txt.T
        loss_i = -(F.log_softmax(logits, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
        loss_t = -(F.log_softmax(logits, 0) * pos / pos.sum(0, keepdim=True)).sum(0).mean()
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        step += 1
        if progress and step % 50 == 0:
            log.info("toy clip step %d  %.0fs  loss %.3f  temp %.1f", step, time.time() - start,
                     float(np.mean(losses[-50:])), float(model.logit_scale.detach().exp()))
    elapsed = time.time() - start
    model.eval()
    metrics = {"heldout_retrieval_64": retrieval_accuracy(model, heldout, 64, tokenizer=tokenizer),
               "train_retrieval_64": retrieval_accuracy(model, train, 64, tokenizer=tokenizer)}
    if progress:
        log.info("toy clip done: %d steps in %.0fs; held-out retrieval %s", step, elapsed,
                 metrics["heldout_retrieval_64"])
    state = pack_state(model, torch.nonzero(seen).flatten())
    with storage.atomic_local_path(out / "toy_clip.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {
        "model_name": MODEL_NAME, "model_cfg": cfg, "image_size": IMAGE_SIZE,
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD),
        "tokenizer": {"kind": "open_clip.SimpleTokenizer",
                      "context_length": cfg["text_cfg"]["context_length"]},
        "training": {"seed": seed, "steps": step, "batch_size": batch_size, "lr": lr,
                     "scenes_rendered": buffer.rendered,
                     "seconds": round(elapsed, 1), "final_loss": float(np.mean(losses[-50:])),
                     "world": {"num_subjects": TRAIN_WORLD_SUBJECTS, "seed": TRAIN_WORLD_SEED,
                               "split": "train"},
                     "caption_forms": CAPTION_FORMS, "edit_prob": 0.5,
                     "torch_threads": torch.get_num_threads()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "token_embedding": {"rows_stored": int(seen.sum()), "other_rows": "zero (never trained)"},
        "metrics": metrics,
    }
    storage.write_text(out / "toy_clip.json", json.dumps(meta, indent=1) + "\n")
    return meta


# --------------------------------------------------------------------------- loading

_EMB = "token_embedding.weight"


def pack_state(model, token_ids) -> dict:
    """The model's state dict for saving: fp16 floats, and of the 49408 x width token
    embedding only the rows of ``token_ids`` (the tokens seen in training), as
    ``token_embedding.rows`` + ``token_embedding.ids``; the others never received a gradient
    and are restored as zeros (an unknown word). Keeps the file at a few MB."""
    import torch

    state = {}
    for k, v in model.state_dict().items():
        if k == _EMB:
            ids = torch.as_tensor(token_ids, dtype=torch.long).unique()
            state["token_embedding.ids"] = ids.contiguous()
            state["token_embedding.rows"] = v[ids].to(torch.float16).contiguous()
        elif k == "attn_mask":
            continue  # a constant buffer, rebuilt by the constructor
        else:
            state[k] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
    return state


def unpack_state(state: dict, model) -> dict:
    """Inverse of :func:`pack_state` for ``model``: float32 state dict with the full token
    embedding (rows never trained are zero)."""
    import torch

    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if "token_embedding.ids" in state:
        ids, rows = state.pop("token_embedding.ids"), state.pop("token_embedding.rows")
        table = torch.zeros_like(model.token_embedding.weight)
        table[ids] = rows
        state[_EMB] = table
    return state



def _load_from(folder: Path):
    from safetensors.torch import load_file

    from suti.weights import check_safetensors, loading, read_json_file

    meta = read_json_file(folder / "toy_clip.json")
    check_safetensors(folder / "toy_clip.safetensors")
    with loading(folder / "toy_clip.safetensors"):
        model = build_toy_clip(meta["model_cfg"])
        state = unpack_state(load_file(str(folder / "toy_clip.safetensors")), model)
        missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if k != "attn_mask"] or unexpected:
        raise ModelLoadError(f"{folder}/toy_clip.safetensors does not match toy_clip.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, Preprocess(meta["image_size"]), get_tokenizer(
        meta["tokenizer"]["context_length"])


def _weights_folder(name: str, files: tuple[str, ...], pretrain, weights_dir) -> Path:
    """The folder holding ``files``: ``weights_dir``, the shipped weights, or a cache folder
    pretrained on first use (with a warning; safe across processes)."""
    if weights_dir is not None:
        folder = Path(weights_dir)
        if not all((folder / f).is_file() for f in files):
            raise ModelLoadError(f"{folder}: no {' + '.join(files)} there")
        return folder
    if all((WEIGHTS_DIR / f).is_file() for f in files):
        return WEIGHTS_DIR
    from filelock import FileLock

    from suti.models import cache_dir

    folder = cache_dir() / "world" / name
    if not all((folder / f).is_file() for f in files):
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not all((folder / f).is_file() for f in files):
                log.warning("no shipped %s weights in %s: pretraining them into %s (minutes)",
                            name, WEIGHTS_DIR, folder)
                pretrain(folder)
    return folder


def load_toy_clip(weights_dir: str | Path | None = None):
    """Load the toy CLIP: ``(model, preprocess, tokenizer)``, model in eval mode, frozen.

    Weights come from ``weights_dir`` when given, else the shipped ``suti/world/weights/``; when
    those are missing they are pretrained once into ``<suti cache>/world/toy_clip`` (a logged
    warning, several minutes). ``preprocess(PIL) -> (3, 32, 32)`` tensor; ``tokenizer(list[str])
    -> (N, 32)`` token ids (standard CLIP BPE).

    Raises:
        ModelLoadError: ``weights_dir`` lacks the files or they do not match their config.
    """
    folder = _weights_folder("toy_clip", ("toy_clip.safetensors", "toy_clip.json"),
                             lambda d: pretrain_clip(d, progress=True), weights_dir)
    return _load_from(folder)


def main(argv: list[str] | None = None) -> int:
    """``python -m suti.world.toy_clip OUT_DIR [--minutes M] [--steps N] [--seed S]``."""
    import torch

    from suti.cli_format import ArgumentParser

    parser = ArgumentParser(description="pretrain the toy CLIP of the synthetic world")
    parser.add_argument("out_dir")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    meta = pretrain_clip(args.out_dir, seed=args.seed, minutes=args.minutes, steps=args.steps)
    print(json.dumps(meta["metrics"], indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from suti.cli_format import report_errors

    raise SystemExit(report_errors(main))
