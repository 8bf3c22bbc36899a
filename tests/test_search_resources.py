"""Tests of ltsearch.search.resources: cluster sizing, without a Ray cluster."""
from __future__ import annotations

import pytest

from ltsearch.config import ConfigError
from ltsearch.search.resources import task_concurrency, trial_resources
from ltsearch.space import SearchSettings


def settings(**resources) -> SearchSettings:
    max_concurrent = resources.pop("max_concurrent", None)
    return SearchSettings.model_validate({"resources": resources, "max_concurrent": max_concurrent})


def test_cpu_trials_fill_the_cpus():
    worker, concurrent = trial_resources(settings(cpus_per_worker=2), {"CPU": 7.0})
    assert worker == {"CPU": 2.0, "GPU": 0.0} and concurrent == 3


def test_gpus_are_used_when_the_cluster_has_them_and_bound_concurrency():
    worker, concurrent = trial_resources(settings(cpus_per_worker=1), {"CPU": 16.0, "GPU": 2.0})
    assert worker == {"CPU": 1.0, "GPU": 1.0} and concurrent == 2


def test_fractional_gpus_pack_several_trials_on_one_gpu():
    worker, concurrent = trial_resources(settings(cpus_per_worker=1, gpus_per_worker=0.25),
                                         {"CPU": 16.0, "GPU": 1.0})
    assert worker["GPU"] == 0.25 and concurrent == 4


def test_max_concurrent_caps_but_never_exceeds_what_fits():
    assert trial_resources(settings(max_concurrent=2), {"CPU": 8.0})[1] == 2
    assert trial_resources(settings(max_concurrent=50), {"CPU": 8.0})[1] == 8


def test_cpu_request_larger_than_the_cluster_is_refused():
    with pytest.raises(ConfigError, match="needs 4 CPUs, the cluster has 2"):
        trial_resources(settings(num_workers=2, cpus_per_worker=2), {"CPU": 2.0})


def test_gpu_request_larger_than_the_clusters_gpus_is_refused():
    """Bug: 2 workers x 1 GPU on a 1-GPU cluster gave 0 concurrent trials, and Tune waited forever."""
    with pytest.raises(ConfigError, match="needs 2 GPUs .*the cluster has 1"):
        trial_resources(settings(num_workers=2, gpus_per_worker=1), {"CPU": 16.0, "GPU": 1.0})


def test_gpu_request_on_a_cluster_without_gpus_is_refused():
    with pytest.raises(ConfigError, match="no GPU"):
        trial_resources(settings(gpus_per_worker=0.5), {"CPU": 4.0})


def test_stage2_tasks_are_bounded_by_cpus_not_gpus():
    """Bug: on a 16-CPU, 1-GPU node the CPU-only stage-2 tasks ran one at a time (capped by the GPU count)."""
    assert task_concurrency(settings(cpus_per_worker=1), {"CPU": 16.0, "GPU": 1.0}) == 16
    assert task_concurrency(settings(cpus_per_worker=2, max_concurrent=3), {"CPU": 16.0, "GPU": 1.0}) == 3


def test_stage2_task_larger_than_the_cluster_is_refused():
    with pytest.raises(ConfigError, match="stage-2 task needs 4 CPUs"):
        task_concurrency(settings(cpus_per_worker=4), {"CPU": 2.0})
