"""The generation job's exactly-once ledger, all under ``OUTPUT`` (a local path or URI):

* ``job.json``: the job's identity (:meth:`generation.config.GenerateConfig.identity`); a rerun
  with other settings is refused;
* ``manifest/<cluster_id>.json``: one object per finished cluster (object stores have no append);
  an older job's ``manifest.jsonl`` is still read;
* ``staging/<cluster_id>.tar``: an accepted cluster's samples, written and read back before its
  manifest row, removed once they are in shards;
* ``run.json``: the latest run's plan, written when it starts (:func:`write_run`): its start
  time and how many clusters it aims at (``--max-clusters`` applied), for ``suti generate --status``;
* ``summary.json``: the counts of the whole output.

Each manifest row written by the driver holds ``finished_at`` (Unix seconds, the driver's clock);
rows of older versions do not (``--status`` then uses the object's modification time).

Samples go into shards through :class:`suti.shards.ShardPacker`.
"""

from __future__ import annotations

import json
import logging

from generation.config import GenerateConfig
from suti import storage
from suti.errors import InputError, MissingInputError
from suti.shards import ShardPacker, group_samples, read_tar, shard_keys, write_tar_atomic

log = logging.getLogger(__name__)

#: One JSON object per finished cluster: ``OUTPUT/manifest/<cluster_id>.json``.
MANIFEST_DIR = "manifest"
#: The manifest of earlier versions (one line per cluster, local appends); still read.
LEGACY_MANIFEST = "manifest.jsonl"
STAGING_DIR = "staging"
JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"


class SamplesMissingError(RuntimeError):
    """An accepted cluster's samples did not reach the driver or could not be read back."""


def read_manifest(output: str) -> dict[str, dict]:
    """Finished clusters by id: ``OUTPUT/manifest/*.json``, plus an older job's
    ``manifest.jsonl`` (a torn last line of a killed driver is ignored)."""
    output = storage.resolve(output)
    done: dict[str, dict] = {}
    legacy = storage.join(output, LEGACY_MANIFEST)
    if storage.isfile(legacy):
        for line in storage.read_text(legacy).splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: ignoring a torn line (interrupted write)", legacy)
                continue
            done[row["cluster_id"]] = row
    folder = storage.join(output, MANIFEST_DIR)
    names = [n for n in storage.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
    if names:
        fs, _ = storage.filesystem(folder)
        paths = [storage.filesystem(storage.join(folder, n))[1] for n in names]
        for data in fs.cat(paths).values():  # concurrent GETs on object stores
            row = json.loads(data)
            done[row["cluster_id"]] = row
    return done


def write_manifest_row(output: str, row: dict) -> None:
    """Record a finished cluster: one object ``OUTPUT/manifest/<cluster_id>.json``, written
    atomically (an object store has no append)."""
    storage.write_text(storage.join(output, MANIFEST_DIR, f"{row['cluster_id']}.json"), json.dumps(row))


def staged_path(output: str, cluster_id: str) -> str:
    """Where an accepted cluster's samples are staged: ``OUTPUT/staging/<cluster_id>.tar``."""
    return storage.join(output, STAGING_DIR, f"{cluster_id}.tar")


def _field_order(field_name: str) -> tuple:
    if field_name == "target.jpg":
        return (0, 0)
    if field_name.startswith("demo_"):
        return (1, int(field_name.split(".")[0].split("_")[1]))
    return (2, 0)


def pack(packer: ShardPacker, samples: dict[str, dict[str, bytes]]) -> None:
    """Add samples ``{key: {field: bytes}}`` to the packer, each sample's members in shard order
    (target, demos, metadata)."""
    for key in sorted(samples):
        packer.add(key, [(f"{key}.{f}", data) for f, data in sorted(samples[key].items(), key=lambda x: _field_order(x[0]))])


def check_samples(summary: dict) -> dict[str, dict[str, bytes]]:
    """The samples of an accepted task result, checked: ``{key: {field: bytes}}``.

    Raises:
        SamplesMissingError: an accepted cluster with no kept key, or a kept key without its
            ``target.jpg`` and ``json`` members (the samples did not come back).
    """
    samples = group_samples(summary.get("members") or [])
    if summary["status"] != "accepted":
        return {}
    kept = summary.get("kept") or []
    if not kept:
        raise SamplesMissingError(f"cluster {summary['cluster_id']}: accepted with no kept sample")
    missing = [k for k in kept if not {"target.jpg", "json"} <= set(samples.get(k, {}))]
    if missing:
        raise SamplesMissingError(f"cluster {summary['cluster_id']}: accepted, but {len(missing)} of its {len(kept)} samples did not reach the driver ({', '.join(missing[:3])})")
    return {k: samples[k] for k in kept}


def stage(output: str, summary: dict, samples: dict) -> None:
    """Write an accepted cluster's samples as one object and read their keys back."""
    uri = staged_path(output, summary["cluster_id"])
    write_tar_atomic(uri, [(f"{k}.{f}", d) for k in sorted(samples) for f, d in sorted(samples[k].items(), key=lambda x: _field_order(x[0]))])
    if shard_keys(uri) != sorted(summary["kept"]):
        raise SamplesMissingError(f"cluster {summary['cluster_id']}: the staged samples at {uri} cannot be read back")


def cleanup_staging(output: str, packer: ShardPacker, done: dict[str, dict]) -> None:
    """Remove the staged samples of recorded clusters once all their samples are in shards."""
    staged = {n[: -len(".tar")] for n in storage.listdir(storage.join(output, STAGING_DIR)) if n.endswith(".tar")}
    for cid in sorted(staged & set(done)):
        if all(k in packer.written for k in done[cid].get("kept", [])):
            storage.remove(staged_path(output, cid))


def check_job(output: str, config: GenerateConfig) -> None:
    """A rerun must use the same inputs and settings as the job it continues
    (:meth:`GenerateConfig.identity`); the first run records them in ``OUTPUT/job.json``. A
    setting that an older job did not record is added to its ``job.json`` (logged).

    Raises:
        InputError: naming each setting that differs, with the recorded and the new value.
    """
    path = storage.join(output, JOB_FILE)
    current = config.identity()
    if not storage.isfile(path):
        storage.write_text(path, json.dumps(current, indent=2))
        return
    saved = json.loads(storage.read_text(path))
    diff = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
    if diff:
        flags = ", ".join(_difference(k, a, b) for k, (a, b) in diff.items())
        raise InputError(f"{output}: an earlier job with other inputs or settings wrote here ({flags}); its samples would be mixed with "
                         "this run's: use another --output, or the same inputs and settings to continue it")
    unrecorded = [k for k in current if k not in saved]
    if unrecorded:
        log.info("%s: recording %s in %s (an older job did not)", output, ", ".join(unrecorded), JOB_FILE)
        storage.write_text(path, json.dumps({**saved, **{k: current[k] for k in unrecorded}}, indent=2))


def _difference(key: str, recorded, now) -> str:
    """One identity difference for the refusal's line; the experts' settings field by field."""
    if key == "expert_settings" and isinstance(recorded, dict) and isinstance(now, dict):
        fields = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
        said = ", ".join(f"{k} {recorded.get(k)!r} -> {now.get(k)!r}" for k in fields)
        return f"the experts' settings as this suti resolves --recipe ({said})"
    return f"{_FLAGS.get(key, key)}: {recorded!r} -> {now!r}"


#: The flag of each identity key, for messages.
_FLAGS = {"clusters": "--clusters", "crawl": "--crawl", "dtype": "--dtype", "model": "--model", "recipe": "--recipe", "steps": "--steps", "lambda": "--lambda",
          "samples_per_prompt": "--samples-per-prompt", "prompts_per_cluster": "--prompts-per-cluster", "sample_steps": "--sample-steps",
          "guidance_scale": "--guidance-scale", "scorer": "--scorer", "samples_per_shard": "--samples-per-shard", "seed": "--seed", "no_filter": "--no-filter"}


def cluster_fingerprint(row: dict) -> str:
    """sha256 of what a cluster is made of in ``clusters.jsonl``: its page, image keys and
    sources, captions, class noun and prompts (recorded in its manifest row as ``inputs``)."""
    import hashlib

    fields = {k: row.get(k) for k in ("page_url", "keys", "sources", "captions", "class_noun", "prompts")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def images_fingerprint(images: list) -> str:
    """sha256 of a cluster's decoded images (mode, size and pixels, in order), recorded in its
    manifest row as ``images``."""
    import hashlib

    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def check_recorded_inputs(output: str, clusters: list[dict], done: dict[str, dict]) -> None:
    """Refuse a rerun whose clusters file changed a finished cluster (other keys, prompts,
    captions, class noun or page than the run that recorded it).

    Raises:
        InputError: naming the first clusters that differ.
    """
    changed = [row["cluster_id"] for row in clusters
               if row["cluster_id"] in done and done[row["cluster_id"]].get("inputs") not in (None, cluster_fingerprint(row))]
    if changed:
        raise InputError(f"{output}: {len(changed)} finished cluster(s) were made from other images, prompts or captions than the clusters file now gives "
                         f"({', '.join(changed[:3])}): use another --output for these clusters")


def repack_staged(output: str, packer: ShardPacker, done: dict[str, dict]) -> None:
    """Re-pack the staged samples that a killed driver left unpacked. An accepted cluster whose
    samples are neither in shards nor staged (lost by an older version) is not done: it is
    removed from ``done``, so that it runs again."""
    for cid in sorted(done):
        row = done[cid]
        if row["status"] != "accepted":
            continue
        missing = [k for k in row.get("kept", []) if k not in packer.written]
        if row.get("kept") and not missing:
            continue
        try:
            samples = group_samples(read_tar(staged_path(output, cid)))
        except MissingInputError:
            samples = {}
        if not row.get("kept") or set(missing) - set(samples):
            log.warning("cluster %s: recorded as accepted but its samples are lost; running it again", cid)
            del done[cid]
            continue
        pack(packer, {k: samples[k] for k in missing})


def read_summary(output: str) -> dict | None:
    """The job's previous ``summary.json`` (``None`` when absent or unreadable)."""
    try:
        return json.loads(storage.read_text(storage.join(output, SUMMARY_FILE)))
    except (MissingInputError, ValueError):
        return None


def write_run(output: str, started_at: float, clusters: int, max_clusters: int | None, to_run: int) -> None:
    """Record the run that starts: ``OUTPUT/run.json`` with ``started_at`` (Unix seconds),
    ``clusters`` (the clusters it aims at: the clusters file's first ``max_clusters``, or all),
    ``max_clusters`` and ``to_run`` (those not finished earlier), and ``first_started_at``: the
    first run's start, carried over from the run.json it replaces. Not part of the job's
    identity: each run replaces it."""
    earlier = read_run(output) or {}
    first = earlier.get("first_started_at", earlier.get("started_at"))
    record = {"started_at": round(started_at, 3), "first_started_at": round(first if isinstance(first, (int, float)) else started_at, 3),
              "clusters": clusters, "max_clusters": max_clusters, "to_run": to_run}
    storage.write_text(storage.join(output, RUN_FILE), json.dumps(record, indent=2))


def read_run(output: str) -> dict | None:
    """The latest run's ``run.json`` (``None`` when absent or unreadable: an older job)."""
    try:
        return json.loads(storage.read_text(storage.join(output, RUN_FILE)))
    except (MissingInputError, ValueError):
        return None
