"""How much of the cluster one trial takes, and how many trials or tasks run at once (no Ray import)."""
from __future__ import annotations

import math

from ..config import ConfigError
from ..space import SearchSettings

__all__ = ["task_concurrency", "trial_resources"]


def trial_resources(settings: SearchSettings, cluster: dict[str, float]) -> tuple[dict[str, float], int]:
    """(resources of one worker as {"CPU": c, "GPU": g}, max concurrent trials) from the settings and the
    cluster's total resources. A trial the cluster cannot hold is refused: Tune would wait for it forever."""
    r = settings.resources
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpus_per_worker = (1.0 if gpus else 0.0) if r.gpus_per_worker is None else r.gpus_per_worker
    if gpus_per_worker > 0 and gpus == 0:
        raise ConfigError(f"search.resources.gpus_per_worker: {gpus_per_worker:g} GPUs per worker requested, "
                          "but the Ray cluster has no GPU")
    need_cpu, need_gpu = r.num_workers * r.cpus_per_worker, r.num_workers * gpus_per_worker
    if need_cpu > cpus:
        raise ConfigError(f"search.resources: a trial needs {need_cpu:g} CPUs, the cluster has {cpus:g}")
    if need_gpu > gpus:
        raise ConfigError(f"search.resources: a trial needs {need_gpu:g} GPUs "
                          f"({r.num_workers} workers x {gpus_per_worker:g}), the cluster has {gpus:g}")
    fits = math.floor(cpus / need_cpu)
    if need_gpu:
        fits = min(fits, math.floor(gpus / need_gpu + 1e-9))
    return {"CPU": r.cpus_per_worker, "GPU": gpus_per_worker}, min(settings.max_concurrent or fits, fits)


def task_concurrency(settings: SearchSettings, cluster: dict[str, float]) -> int:
    """Concurrent stage-2 tasks of a staged search: CPU work on cached features (one worker's CPUs each),
    so only the cluster's CPUs bound them, never its GPUs."""
    cpus_per_task = settings.resources.cpus_per_worker
    fits = math.floor(cluster.get("CPU", 0.0) / cpus_per_task)
    if fits < 1:
        raise ConfigError(f"search.resources.cpus_per_worker: a stage-2 task needs {cpus_per_task:g} CPUs, "
                          f"the cluster has {cluster.get('CPU', 0.0):g}")
    return min(settings.max_concurrent or fits, fits)
