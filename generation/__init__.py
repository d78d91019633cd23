"""The expert generation job (``suti generate``; SuTI Algorithm 1): one DreamBooth expert per
mined cluster, trained on Ray, sampled on the cluster's unseen prompts, kept by delta-CLIP and
written exactly once into webdataset shards.

* :mod:`generation.config`: :class:`~generation.config.GenerateConfig` (the driver's settings) and
  :class:`~generation.config.ExpertJob` (what each expert task reads, across the Ray boundary);
* :mod:`generation.job`: :func:`~generation.job.run_generation`, the job;
* :mod:`generation.ledger`: the exactly-once ledger (``job.json``, ``run.json``, manifest, staging, summary);
* :mod:`generation.scheduler`: Ray tasks or resident workers, retries, progress;
* :mod:`generation.task`: one cluster's expert (train, sample, filter);
* :mod:`generation.resident`: the resident expert worker (a Ray actor; batches of LoRA experts);
* :mod:`generation.status`: ``suti generate --status``, a job's progress read from its output;
* :mod:`generation.cli`: ``suti generate``.

This layer may import the stages it runs (:mod:`experts`, :mod:`mining`) and the foundation
(:mod:`suti`); nothing below it imports it.
"""
