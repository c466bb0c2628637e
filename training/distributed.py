"""Multi-process training with DistributedDataParallel (torchrun): gloo on CPU, nccl on CUDA.

The contrastive losses need the global batch: features are all-gathered across ranks and every
rank computes the same loss on the global batch. The gather is differentiable: the backward pass
all-reduces the gradient of the gathered features and hands each rank the slice for its own
samples. Each rank's local features therefore receive world_size x dL/d(local features), and DDP's
gradient averaging divides that back, so encoder *and* temperature gradients equal those of one
process on the concatenated batch (tests/test_ddp.py checks this for CLIP and CLOOB).

BatchNorm statistics stay per process (standard DDP behaviour).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.n = rank, local.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum of every rank's gradient w.r.t. the global features
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_features(local: torch.Tensor) -> torch.Tensor:
    """All ranks' features in rank order (equal batch sizes per rank), differentiable."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
