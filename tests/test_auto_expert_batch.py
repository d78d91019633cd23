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
