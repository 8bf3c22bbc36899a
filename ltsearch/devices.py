"""Where and how a run computes: its device, its mixed precision, and its data-parallel rank and world size
(under an initialised `torch.distributed` process group, as Ray Train runs one process per rank)."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

__all__ = ["all_sum", "autocast", "rank_world", "resolve_device", "resolve_precision"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but no CUDA device is available")
    if name == "cuda":  # the device the launcher (e.g. Ray Train) selected for this rank
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if rank_world()[1] > 1:
        dist.all_reduce(t)
    return t


def resolve_precision(name: str, device: torch.device) -> str:
    """`trainer.precision` on `device`. `auto`: bf16 autocast on a CPU with bf16 instructions (AVX-512 BF16 or
    AMX; there it trains ResNet-8/20/32 1.6x faster than fp32 at the same accuracy, docs/benchmarks.md "bf16 on
    the CPU"), fp32 on other CPUs; on CUDA, bf16 autocast where the GPU has bf16, else fp16 AMP."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return "bf16" if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
