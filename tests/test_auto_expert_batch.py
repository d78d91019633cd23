"""--expert-batch-size left to the resident worker: as many stacked experts as its GPU holds,
1 on a CPU (issue 32, item 6)."""

from experts.stacked import MAX_AUTO_EXPERTS, experts_that_fit
from generation.config import GenerateConfig
from generation.scheduler import experts_in_flight, worker_capacity_bound


def test_experts_that_fit_divides_the_free_memory_after_a_reserve():
    gib = 2**30
    assert experts_that_fit(60 * gib, 5 * gib) == 10  # 51 GiB usable after 15%
    assert experts_that_fit(60 * gib, 5 * gib, reserve=0.0) == 12
    assert experts_that_fit(2 * gib, 5 * gib) == 1  # never below one
    assert experts_that_fit(1000 * gib, gib) == MAX_AUTO_EXPERTS  # never above the bound
    assert experts_that_fit(60 * gib, 0) == 1  # a CPU measures nothing


def _config(**kw):
    return GenerateConfig(clusters="c.jsonl", crawl="crawl", output="out", resident_workers=True, **kw)


def test_a_cpu_job_keeps_one_expert_per_worker_and_a_gpu_job_asks_the_worker():
    config = _config()
    assert config.expert_batch_size is None
    assert worker_capacity_bound(config, gpus=0) == 1
    assert worker_capacity_bound(config, gpus=1) == MAX_AUTO_EXPERTS
    assert worker_capacity_bound(_config(expert_batch_size=4), gpus=1) == 4
    # two CPU slots, two workers of one expert each (as before); one GPU: one worker that may hold up to the bound
    assert experts_in_flight(config, 0, {"CPU": 2}) == 2
    assert experts_in_flight(config, 1, {"CPU": 4, "GPU": 1}) == MAX_AUTO_EXPERTS


def test_the_resident_worker_on_a_cpu_trains_one_expert_at_a_time(monkeypatch):
    from generation.resident import ResidentExpertWorker

    worker = ResidentExpertWorker.__new__(ResidentExpertWorker)
    worker.job = _config().expert_job("cpu")
    assert worker._experts_that_fit() == 1


import pytest


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_the_memory_probe_step_runs_on_every_family_and_leaves_no_adapter(model):
    """The step :func:`experts.stacked.measure_bytes_per_expert` measures on CUDA runs on any
    family's denoiser (run here on the CPU: the U-Net and FLUX's transformer), takes the LoRA
    through a backward pass and leaves the model as it found it."""
    import torch

    from experts.recipe import resolve_config
    from experts.stacked import probe_training_step
    from suti.denoisers import denoiser_module
    from suti.models import load_pipeline

    pipe = load_pipeline(model)
    module = denoiser_module(pipe)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    config = resolve_config("dreambooth-lora", {"model": model, "instance_dir": "photos", "class_noun": "dog", "lora_rank": 2, "resolution": 32})
    grads = []
    orig_backward = torch.Tensor.backward

    def backward(self, *a, **kw):
        orig_backward(self, *a, **kw)
        grads.extend(p.grad.abs().sum().item() for n, p in module.named_parameters() if "_memory_probe" in n and p.grad is not None)

    torch.Tensor.backward = backward
    try:
        probe_training_step(pipe, config, "cpu")
    finally:
        torch.Tensor.backward = orig_backward
    assert grads and any(g > 0 for g in grads)  # the throwaway LoRA got gradients
    after = {n.replace(".base_layer", ""): p for n, p in module.named_parameters()}  # peft keeps its empty wrappers
    assert set(after) == set(before)  # the adapter is gone
    assert all(torch.equal(before[n], p) and p.grad is None for n, p in after.items())
