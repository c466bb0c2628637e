"""Multi-process training with DistributedDataParallel (torchrun): gloo on CPU, nccl on CUDA.

The backend follows the *resolved* device (``--device auto`` on a GPU machine gets nccl); each rank
pins its GPU (``torch.cuda.set_device``) before joining, passes it as ``device_id``, and the group
this module made is destroyed when training ends, also on error (:func:`init_distributed`,
:func:`cleanup`). The device choices are plain functions (:func:`device_for_rank`,
:func:`backend_for`) so tests/test_gpu_logic.py checks them without a GPU.

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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process made the group, so it destroys it (cleanup)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def device_for_rank(
    name: str,
    local_rank: int = 0,
    local_world_size: int = 1,
    cuda_available: bool = False,
    cuda_count: int = 0,
) -> torch.device:
    """The device of the process with `local_rank` among `local_world_size` on this machine.

    ``auto``: ``cuda`` when CUDA is available, else ``cpu``. ``cuda``: ``cuda:LOCAL_RANK``, one GPU per
    process. ``cuda:N`` names one GPU, so it is refused with several processes per machine (they would
    all share it); restrict the GPUs with ``CUDA_VISIBLE_DEVICES`` instead.
    """
    if name == "auto":
        name = "cuda" if cuda_available else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type != "cuda":
        return device
    if not cuda_available:
        raise ValueError(f"--device {name} was asked for but CUDA is not available")
    if device.index is None:
        device = torch.device("cuda", local_rank)
    elif local_world_size > 1:
        raise ValueError(
            f"--device {name} puts all {local_world_size} processes of this machine on one GPU; "
            "use --device cuda (process r gets cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose GPUs"
        )
    if device.index >= cuda_count:
        who = f"--device {name}" if name != "cuda" else f"--device cuda with LOCAL_RANK {local_rank}"
        raise ValueError(
            f"{who} needs GPU {device.index} but {cuda_count} GPU(s) are visible "
            "(one process per GPU: --nproc-per-node at most the number of GPUs)"
        )
    return device


def backend_for(device: torch.device) -> str:
    """The process-group backend for the resolved device: nccl on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def launch_env() -> tuple[int, int]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them; (0, 1) for a plain process."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment; one process otherwise.

    On CUDA the rank's GPU becomes the current device before the group is made (so NCCL does not
    guess it) and is passed as ``device_id``.
    """
    local_rank, _ = launch_env()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(
            backend=backend_for(device), device_id=device if device.type == "cuda" else None
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


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


def cleanup(info: DistInfo | None = None) -> None:
    """Destroy the process group (only the one `info` says this module made, when given)."""
    if info is not None and not info.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
