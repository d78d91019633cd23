"""The generation job's settings: :class:`GenerateConfig` (the driver's, from ``suti generate``)
and :class:`ExpertJob` (what each expert task reads, across the Ray boundary).

:class:`ExpertJob` is a frozen dataclass: it is pickled into every Ray task and resident worker,
and the task reads it as attributes, never as a dict of string keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from suti import storage
from suti.errors import InputError

KEEP_EXPERTS_FORMATS = ("diffusers", "kohya")  # layouts of kept LoRA experts (--keep-experts-format)
MAX_EXPERT_BATCH_SIZE = 256  # LoRA experts a resident worker trains in one U-Net pass (also its actor's thread count)


@dataclass
class GenerateConfig:
    """Settings of one generation job (the identity part is recorded in ``OUTPUT/job.json``).

    ``clusters``, ``crawl`` and ``output`` are local paths or storage URIs. ``scorer`` ``None``
    follows the model (:func:`suti.scoring.model_scorer`). ``gpus_per_expert`` ``None``: 1 on a
    cluster with GPUs, else 0 (fractions pack several experts on one GPU).
    """

    clusters: str
    crawl: str
    output: str
    model: str = "toy"
    recipe: str = "suti-expert"
    steps: int | None = None
    recipe_overrides: dict = field(default_factory=dict)
    lambda_: float = 0.02
    samples_per_prompt: int = 1
    prompts_per_cluster: int | None = 4
    sample_steps: int = 25
    guidance_scale: float = 7.5
    sample_batch_size: int = 4  # candidates per pipeline call (not part of the job's identity: images do not depend on it)
    scorer: str | None = None
    samples_per_shard: int = 64
    max_clusters: int | None = None
    keep_experts: bool = False
    keep_experts_format: str = "diffusers"  # kohya: kept LoRA experts also hold kohya's layout (not part of the identity)
    no_filter: bool = False
    seed: int = 0
    ray_address: str | None = None
    gpus_per_expert: float | None = None
    cpus_per_expert: float = 1.0
    max_workers: int | None = None
    max_retries: int = 2
    retry_failed: bool = False
    threads_per_expert: int = 1
    resident_workers: bool = False
    expert_batch_size: int | None = None  # LoRA experts a resident worker trains together; None: as many as fit its GPU, 1 on CPU (not part of the job's identity: samples equal up to float rounding)
    compile: bool = False  # train stacked experts through torch.compile (not part of the identity)
    dtype: str | None = None  # sampling dtype: fp32, fp16, bf16 (None: fp16 on CUDA, fp32 on CPU)
    job_name: str | None = None  # the "job" tag of the driver's Ray metrics (None: the output's last path component; not part of the identity)
    recipe_data: dict | None = None  # the recipe as loaded on the driver (resolved()): workers never read the driver's disk for it
    expert_settings: dict | None = None  # every expert setting as this suti resolves the recipe (resolved(); part of the identity)

    def __post_init__(self) -> None:
        """Refuse bad settings at once, before anything is written (InputError naming the flag):
        every numeric setting by its kind (:func:`generate_number`, the kinds ``suti generate``
        parses its flags with: the sampler's as every sampler's), then the job's combinations."""
        from suti.errors import InvalidValueError
        from suti.sampling import resolve_dtype

        for flag, value in (("--clusters", self.clusters), ("--crawl", self.crawl), ("--output", self.output)):
            if not str(value).strip():
                raise InvalidValueError(f"{flag} must name a file, folder or URI, got an empty string")
        for name, kind in _generate_numbers().items():
            value = getattr(self, name)
            if value is not None:  # a whole number given as 2.0 is stored as 2
                setattr(self, name, kind.check(value, _FLAGS.get(name, "--" + name.replace("_", "-"))))
        if (self.expert_batch_size or 1) > 1 and not self.resident_workers:
            raise InvalidValueError(f"--expert-batch-size {self.expert_batch_size} needs --resident-workers (a plain task trains one expert)")
        if self.max_workers is not None and self.max_workers < (self.expert_batch_size or 1):
            raise InvalidValueError(f"--max-workers {self.max_workers} (experts in flight) is below --expert-batch-size {self.expert_batch_size}: no batch could fill; "
                                    f"use --max-workers {self.expert_batch_size} or more")
        resolve_dtype(self.dtype)
        if self.keep_experts_format not in KEEP_EXPERTS_FORMATS:
            raise InvalidValueError(f"--keep-experts-format {self.keep_experts_format!r}: unknown; formats: {', '.join(KEEP_EXPERTS_FORMATS)}")
        if self.keep_experts_format != "diffusers" and not self.keep_experts:
            raise InvalidValueError(f"--keep-experts-format {self.keep_experts_format} goes with --keep-experts (no expert is kept without it)")
        if self.job_name is not None and not self.job_name.strip():
            raise InvalidValueError("--job-name must not be empty (the default is the output's last path component)")

    @property
    def metrics_job(self) -> str:
        """The ``job`` tag of the driver's Ray metrics: ``job_name``, else the output's last path
        component (``s3://bucket/jobs/run7`` -> ``run7``)."""
        return self.job_name or storage.resolve(self.output).rstrip("/").rsplit("/", 1)[-1]

    def expert_job(self, device: str) -> "ExpertJob":
        """The settings every expert task reads (:class:`ExpertJob`), for tasks placed on
        ``device`` (``"cuda"`` when a task holds a GPU, else ``"cpu"``)."""
        names = {f.name for f in dataclasses.fields(ExpertJob)} - {"device"}
        fields = {k: getattr(self, k) for k in names}
        if self.keep_experts and self.keep_experts_format == "kohya":  # save_expert writes the kohya file (not in the identity's overrides)
            fields["recipe_overrides"] = {**self.recipe_overrides, "output_kohya_format": True}
        return ExpertJob(device=device, **fields)

    def identity(self) -> dict:
        """The settings that make the job's samples what they are (``OUTPUT/job.json``; a rerun
        into the same output must match them). ``lambda`` is spelled as in the paper."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in IDENTITY_FIELDS}
        d["lambda"] = d.pop("lambda_")
        if d.get("expert_settings") is None:  # not resolved: nothing to compare
            d.pop("expert_settings", None)
        return d

    def resolved(self) -> "GenerateConfig":
        """A copy with absolute paths/URIs and the scorer chosen and checked.

        Raises:
            InputError: a model that cannot be loaded (:func:`suti.models.check_model`), expert
                settings the recipe refuses (``--steps 0``), a toy scorer with a real model, an
                unknown scorer, a missing crawl, or a URI whose
                filesystem package is missing.
        """
        from suti.scoring import check_scorer_for_model, model_scorer

        from experts import resolve_config
        from experts.recipe import load_recipe
        from suti.models import check_model, hub_offline, portable_model

        check_model(self.model)  # on the driver: not a job whose every expert fails to load it
        # the experts' settings (--steps, --lora-rank, the recipe), checked as each task will
        recipe_data = load_recipe(self.recipe)  # a name, a local YAML or a URI, read once here and shipped in the job
        expert = resolve_config(recipe_data, {"model": self.model, "instance_dir": ".", "class_noun": "object", "steps": self.steps, **self.recipe_overrides})
        from experts.batched import PER_EXPERT_FIELDS

        # every shared setting as this suti resolves it: a rerun by a suti whose defaults changed
        # (e.g. the resize filter) must not train the rest of the job's experts differently
        expert_settings = {k: v for k, v in expert.to_dict().items() if k not in PER_EXPERT_FIELDS | {"model", "steps"}}  # those two: identity keys of their own
        if self.keep_experts and self.keep_experts_format == "kohya":
            if expert.lora_rank == 0 or expert.use_dora:
                raise InputError(f"--keep-experts-format kohya keeps plain LoRA experts in kohya's layout; recipe {self.recipe} trains "
                                 f"{'DoRA' if expert.lora_rank else 'full fine-tunes (pass --lora-rank 4)'}")
            try:  # as each task will (FLUX refused), named by this command's flag
                resolve_config(recipe_data, {"model": self.model, "instance_dir": ".", "class_noun": "object", "steps": self.steps, **self.recipe_overrides, "output_kohya_format": True})
            except InputError as exc:
                raise InputError(str(exc).replace("--output-kohya-format", "--keep-experts-format kohya", 1)) from None
        if (self.expert_batch_size or 1) > 1:
            from experts.batched import check_batchable

            check_batchable([expert])  # LoRA, no text encoder training, no accumulation: before job.json
        scorer = check_scorer_for_model(self.scorer or model_scorer(self.model), self.model)
        out = dataclasses.replace(self, clusters=storage.resolve(self.clusters), crawl=storage.resolve(self.crawl), output=storage.resolve(self.output), scorer=scorer,
                                  model=portable_model(self.model), recipe=storage.absolute_if_local(self.recipe), recipe_data=recipe_data,
                                  expert_settings=expert_settings)  # workers have other working directories
        for uri in (out.clusters, out.crawl, out.output):
            storage.filesystem(uri)  # a missing s3fs/gcsfs exits 2 here, before anything is written
        storage.require_bucket(out.output)  # a missing bucket: one line, before job.json
        from suti.raytools import check_ray_address

        check_ray_address(self.ray_address)  # an unreachable cluster: one line, before job.json
        from mining.crawl import check_crawl

        check_crawl(out.crawl)  # a folder, shard file, manifest or pattern, as `suti mine` reads
        if hub_offline() and not scorer.startswith("toy-"):
            from suti.scoring import get_scorer

            get_scorer(scorer)  # offline, weights that are not cached fail here (exit 2), not in every task minutes later
        return out


#: :class:`GenerateConfig` fields whose flag is not ``--`` + the name with dashes.
_FLAGS = {"lambda_": "--lambda", "threads_per_expert": "threads_per_expert"}

def _generate_numbers() -> dict:
    """The kind of every numeric :class:`GenerateConfig` field (:mod:`suti.checks`): one table for
    ``suti generate``'s flags (``type=``) and :meth:`GenerateConfig.__post_init__` (a config made
    by a Python caller or a benchmark is checked the same way)."""
    from experts.recipe import expert_number
    from mining.cli import MAX_PROMPTS_PER_CLUSTER, SAMPLES_PER_SHARD
    from suti import checks
    from suti.sampling import GUIDANCE_SCALE, NUM_IMAGES, SEED, STEPS

    return {
        "steps": expert_number("steps"),  # the experts' steps (over the recipe's)
        "lambda_": checks.real(-2.0, 2.0),  # a delta-CLIP threshold: a difference of two cosines
        "samples_per_prompt": NUM_IMAGES,
        "prompts_per_cluster": checks.whole(1, MAX_PROMPTS_PER_CLUSTER),  # None: every prompt
        "sample_steps": STEPS,
        "guidance_scale": GUIDANCE_SCALE,
        "sample_batch_size": NUM_IMAGES,
        "samples_per_shard": SAMPLES_PER_SHARD,
        "max_clusters": checks.COUNT,
        "seed": SEED,
        "gpus_per_expert": checks.real(0.0, 1024.0),  # 0: CPU tasks; fractions pack experts on a GPU
        "cpus_per_expert": checks.real(0.0, 1024.0, lo_open=True),
        "max_workers": checks.whole(1, 1_000_000),
        "max_retries": checks.whole(0, 100),
        "threads_per_expert": checks.whole(1, 1024),
        "expert_batch_size": checks.whole(1, MAX_EXPERT_BATCH_SIZE),
    }


def generate_number(name: str):
    """The :class:`suti.checks.Number` of a :class:`GenerateConfig` field (an ``argparse`` type);
    ``"prompts_per_cluster_or_all"``: the flag's kind, whose 0 means every prompt."""
    if name == "prompts_per_cluster_or_all":
        from mining.cli import MAX_PROMPTS_PER_CLUSTER
        from suti import checks

        return checks.whole(0, MAX_PROMPTS_PER_CLUSTER)
    return _generate_numbers()[name]


@dataclass(frozen=True)
class ExpertJob:
    """What one expert task needs of its job: the model, the expert recipe, sampling and the
    delta-CLIP filter. Made on the driver by :meth:`GenerateConfig.expert_job` from the resolved
    config (absolute paths, the recipe's contents, the scorer chosen), so a worker never reads the
    driver's disk.

    Attributes:
        model: a preset name, hub id or (absolute) pipeline folder.
        scorer: the delta-CLIP scorer (:func:`suti.scoring.get_scorer`).
        output: the job's output (local path or URI): kept experts go to ``output/experts/<id>``.
        recipe / recipe_data: the expert recipe's name or path, and its contents as loaded on the driver.
        steps / recipe_overrides: expert settings over the recipe (``None``: the recipe's).
        lambda_: the delta-CLIP threshold lambda; ``no_filter`` keeps every candidate.
        samples_per_prompt / prompts_per_cluster: candidates per cluster (``None``: every prompt).
        sample_steps / guidance_scale / sample_batch_size / dtype: the sampler's settings
            (``dtype`` ``None``: fp16 on CUDA, fp32 on CPU).
        seed: the job's seed (each cluster's is derived from it and the cluster id).
        keep_experts: upload each expert to ``output/experts``.
        threads_per_expert: torch threads per task.
        expert_batch_size: LoRA experts a resident worker trains together (``None``: as many as
            fit its GPU's free memory, :meth:`generation.resident.ResidentExpertWorker.capacity`;
            1 on a CPU or for full fine-tuning).
        compile: train them through ``torch.compile`` (:func:`experts.batched.train_lora_experts`).
        device: ``"cuda"`` when the task holds a GPU, else ``"cpu"``.
    """

    model: str
    scorer: str | None
    output: str
    recipe: str = "suti-expert"
    recipe_data: dict | None = None
    steps: int | None = None
    recipe_overrides: dict = field(default_factory=dict)
    lambda_: float = 0.02
    no_filter: bool = False
    samples_per_prompt: int = 1
    prompts_per_cluster: int | None = None
    sample_steps: int = 25
    guidance_scale: float = 7.5
    sample_batch_size: int = 4
    dtype: str | None = None
    seed: int = 0
    keep_experts: bool = False
    threads_per_expert: int = 1
    expert_batch_size: int | None = None
    compile: bool = False
    device: str = "cpu"


#: The :class:`GenerateConfig` fields of the job's identity (``OUTPUT/job.json``): its inputs (the
#: clusters file and the crawl, as resolved URIs), the experts' and the sampler's settings (the
#: sampling ``dtype`` included) and the filter. A rerun into the same output must match them.
IDENTITY_FIELDS = ("clusters", "crawl", "dtype", "model", "recipe", "steps", "recipe_overrides", "expert_settings", "lambda_", "samples_per_prompt", "prompts_per_cluster", "sample_steps", "guidance_scale", "scorer", "samples_per_shard", "seed", "no_filter")
