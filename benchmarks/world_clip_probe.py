"""How well the synthetic world's small models measure fidelity (held-out subjects only).

Prints, for the shipped (or cache-trained) toy CLIP and attribute probe:

1. toy CLIP caption retrieval: top-1 among 64 scenes of 64 different held-out subjects (half of
   them edited) and their world captions, image->text and text->image, vs chance 1/64;
2. toy CLIP edit sensitivity: for edited held-out scenes, how often the true caption scores
   above the same caption with the edited attribute (colour / accessory / style) or the
   context swapped for another value (chance 0.5) - what CLIP-T needs to reflect prompts;
3. probe accuracy per attribute on held-out renders (half of them edited) vs chance, and its
   identity accuracy on unedited renders of the right subject vs another subject of the class;
4. identity-embedding subject retrieval: leave-one-out nearest neighbour among 4 renders each
   of 64 held-out subjects vs chance, for the probe's identity embedding, its raw identity
   features, its head probabilities and the toy CLIP image embedding; then the harder version
   over all 270 held-out subjects with half of the renders edited (accessory or style).

Run: ``python benchmarks/world_clip_probe.py [--repeats 4]`` (about a minute on one core).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _edit_sensitivity(model, subjects, n: int, seed: int) -> dict[str, float]:
    import torch

    from suti.world.render import caption, sample_scene
    from suti.world.spec import ACCESSORIES, COLORS, CONTEXTS, STYLES
    from suti.world.toy_clip import encode_images, encode_texts

    rng = np.random.default_rng(seed)
    wins: dict[str, list[bool]] = {"attribute": [], "accessory": [], "style": [], "context": []}
    for _ in range(n):
        subject = subjects[int(rng.integers(len(subjects)))]
        img, text, meta = sample_scene(subject, rng, size=32, edit_prob=1.0)
        kw = {"color_override": meta["color"] if meta["edit"] == "attribute" else None,
              "accessory": meta["accessory"], "style": meta["style"]}
        kind = meta["edit"]
        pool = {"attribute": ("color_override", [c for c in COLORS if c != meta["color"]]),
                "accessory": ("accessory", [a for a in ACCESSORIES if a != meta["accessory"]]),
                "style": ("style", [s for s in STYLES if s != meta["style"]])}[kind]
        wrong = dict(kw, **{pool[0]: pool[1][int(rng.integers(len(pool[1])))]})
        other_ctx = [c for c in CONTEXTS if c != meta["context"]]
        texts = [text, caption(subject, meta["context"], **wrong),
                 caption(subject, other_ctx[int(rng.integers(len(other_ctx)))], **kw)]
        with torch.no_grad():
            sims = (encode_images(model, [img]) @ encode_texts(model, texts).T)[0]
        wins[kind].append(bool(sims[0] > sims[1]))
        wins["context"].append(bool(sims[0] > sims[2]))
    return {k: float(np.mean(v)) for k, v in wins.items()}


def _same_class_other(subject, pool):
    for s in pool:
        if s.class_name == subject.class_name and s.subject_id != subject.subject_id:
            return s
    return None


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark (see the module docstring); returns 0."""
    import torch

    from suti.world.probe import IDENTITY_HEADS, evaluate_probe, load_probe, nn_retrieval
    from suti.world.render import sample_scene
    from suti.world.toy_clip import encode_images, load_toy_clip, retrieval_accuracy, \
        training_world

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="random 64-subject batches (4)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    world = training_world()
    held = world.heldout_subjects
    model, _, tokenizer = load_toy_clip()
    probe = load_probe()
    n_clip = sum(p.numel() for p in model.parameters())
    print(f"world: {len(world.subjects)} subjects, seed {world.seed}; models trained on "
          f"{len(world.train_subjects)} train subjects, evaluated on {len(held)} held-out ones")
    print(f"toy CLIP: {n_clip:,} parameters; probe: {probe.parameter_count():,} parameters")

    print("\n1. toy CLIP caption retrieval (64 held-out subjects, one scene each, 50% edited)")
    runs = [retrieval_accuracy(model, held, 64, seed=100 + r, tokenizer=tokenizer)
            for r in range(args.repeats)]
    chance = runs[0]["chance"]
    for key in ("image_to_text", "text_to_image"):
        acc = float(np.mean([r[key] for r in runs]))
        print(f"   {key:14s} top-1 {acc:.3f}   chance {chance:.4f}   x{acc / chance:.1f} chance")
    runs0 = [retrieval_accuracy(model, held, 64, seed=200 + r, edit_prob=0.0,
                                tokenizer=tokenizer) for r in range(args.repeats)]
    acc = float(np.mean([r["image_to_text"] for r in runs0]))
    print(f"   unedited scenes image_to_text top-1 {acc:.3f}   x{acc / chance:.1f} chance")

    print("\n2. toy CLIP edit sensitivity: true caption beats a one-attribute-swapped caption "
          "(chance 0.5)")
    sens = _edit_sensitivity(model, held, 100 * args.repeats, seed=7)
    for key, acc in sens.items():
        print(f"   {key:10s} {acc:.3f}")

    print("\n3. probe on held-out subjects (4 renders each of 64 subjects)")
    metrics = [evaluate_probe(probe, held, seed=300 + r) for r in range(args.repeats)]
    for head in metrics[0]["attributes"]:
        acc = float(np.mean([m["attributes"][head] for m in metrics]))
        ch = metrics[0]["chance"][head]
        print(f"   {head:14s} acc {acc:.3f}   chance {ch:.3f}")
    ident = float(np.mean([m["identity_accuracy"] for m in metrics]))
    ident_pc = float(np.mean([m["identity_accuracy_with_pattern_color"] for m in metrics]))
    print(f"   identity accuracy (class, colour, pattern, part, aspect all right, unedited "
          f"renders): {ident:.3f}; with pattern colour too: {ident_pc:.3f}")
    rng = np.random.default_rng(11)
    right, wrong = [], []
    for subject in held[:48]:
        other = _same_class_other(subject, held)
        images = [sample_scene(subject, rng, size=32)[0] for _ in range(4)]
        right.append(probe.identity_accuracy(images, subject))
        wrong.append(probe.identity_accuracy(images, other))
    print(f"   identity accuracy vs the right subject {np.mean(right):.3f}, vs another held-out "
          f"subject of the same class {np.mean(wrong):.3f}")

    print("\n4. identity embedding: nearest neighbour is the same subject (64 held-out subjects "
          "x 4 unedited renders)")
    names = ("embedding", "identity_features", "head_probs")
    for name in names:
        acc = float(np.mean([m["retrieval"][name] for m in metrics]))
        label = {"embedding": "probe identity embedding (used)",
                 "identity_features": "probe identity-branch features",
                 "head_probs": "probe identity-head probabilities"}[name]
        print(f"   {label:36s} {acc:.3f}")
    clip_acc = []
    for r in range(args.repeats):
        rng = np.random.default_rng(300 + r)
        chosen = [held[int(i)] for i in rng.permutation(len(held))[:64]]
        images = [sample_scene(s, rng, size=32)[0] for s in chosen for _ in range(4)]
        owner = torch.arange(len(chosen)).repeat_interleave(4)
        clip_acc.append(nn_retrieval(encode_images(model, images), owner))
    print(f"   {'toy CLIP image embedding':36s} {np.mean(clip_acc):.3f}")
    print(f"   chance {metrics[0]['retrieval']['chance']:.4f}")

    print(f"\n   harder: all {len(held)} held-out subjects x 4 renders, half of them edited "
          f"(accessory or style)")
    rng = np.random.default_rng(12)
    images = [sample_scene(s, rng, size=32, edit_prob=0.5, edit_kinds=("accessory", "style"))[0]
              for s in held for _ in range(4)]
    owner = torch.arange(len(held)).repeat_interleave(4)
    out = probe._forward(images)
    probs = torch.cat([torch.softmax(out[h], 1) for h in IDENTITY_HEADS], 1)
    embs = {"probe identity embedding (used)": out["embedding"],
            "probe identity-branch features": out["identity"],
            "probe identity-head probabilities": probs,
            "toy CLIP image embedding": encode_images(model, images)}
    for label, emb in embs.items():
        acc = nn_retrieval(torch.nn.functional.normalize(emb.float(), dim=1), owner)
        print(f"   {label:36s} {acc:.3f}")
    print(f"   chance {3 / (len(images) - 1):.4f}")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
