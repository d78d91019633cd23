"""Make small (demos, prompt, target) shards straight from the synthetic world, for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from suti.shards import ShardPacker, jpeg_bytes, sample_members
from suti.world import caption, make_world, render
from suti.world.render import Pose
from suti.world.spec import CONTEXTS


def world_shards(folder: Path, num_subjects: int = 6, per_subject: int = 4, num_demos: int = 4, size: int = 32, seed: int = 0, samples_per_shard: int = 8) -> Path:
    """Oracle shards: demos are renders of a subject, targets the same subject elsewhere."""
    world = make_world(num_subjects, seed=seed)
    rng = np.random.default_rng(seed)
    packer = ShardPacker(folder, samples_per_shard)
    contexts = sorted(CONTEXTS)
    for s in world.subjects[:num_subjects]:
        demos = []
        for i in range(num_demos):
            ctx = contexts[int(rng.integers(len(contexts)))]
            demos.append((render(s, ctx, pose=Pose.random(rng), size=size, rng=rng), caption(s, ctx)))
        for j in range(per_subject):
            ctx = contexts[int(rng.integers(len(contexts)))]
            target = render(s, ctx, pose=Pose.random(rng), size=size, rng=rng)
            key = f"{s.subject_id}_p{j:02d}_s00"
            meta = {"cluster_id": s.subject_id, "prompt": caption(s, ctx), "demo_captions": [c for _, c in demos], "delta_clip": 0.1}
            packer.add(key, sample_members(key, jpeg_bytes(target), [jpeg_bytes(d) for d, _ in demos], meta))
    packer.flush()
    return folder
