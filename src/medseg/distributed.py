"""Training on several processes with PyTorch's DistributedDataParallel (gloo on CPU, NCCL on GPUs).

Launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or by `medseg train --nproc N`,
which starts torchrun on this machine. How a run stays one run:

- every rank draws the whole global batch from the same seeded generator and trains on its share (its slice of
  the batch), so the ranks' random streams never diverge: a checkpoint written by rank 0 resumes every rank, and
  the run matches a single process with the same global batch. (Each rank repeats the drawing and augmentation
  of the other ranks' samples: cheap beside a step, and the price of that simplicity.)
- gradients are averaged by DDP; soft-Dice sums are added across ranks first (`global_sum`, differentiable), so
  the batch Dice is the whole global batch's, as in one process (nnU-Net does the same for its DDP Dice).
- rank 0 alone validates, writes checkpoints, history and summaries, and prints; what it decides (validation
  scores, the time budget's step count, running out of time) is broadcast, so every rank stops at the same step.
- BatchNorm layers become SyncBatchNorm on GPUs (statistics over the global batch); on CPU, where PyTorch has no
  SyncBatchNorm, each process normalises over its own share and keeps its own running statistics (rank 0's are
  checkpointed), so such a run is close to, not equal to, one process. Instance norm is per sample and
  unaffected: with it, the run equals one process up to the order of floating-point sums.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    """Whether this process is one of several training together (and the process group is up)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Join the process group torchrun described (once); a GPU rank takes the GPU of its local rank."""
    if world_size() < 2 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # rank 0 alone validates and chooses the post-processing while the others wait: allow it hours, not minutes
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    return device


def backend() -> str | None:
    return dist.get_backend() if active() else None


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch (B, ...): B / world size samples."""
    if not active():
        return batch
    size = batch.shape[0] // dist.get_world_size()
    return batch[rank() * size:(rank() + 1) * size]


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over the ranks, differentiable (each rank's gradient flows back to it). Only for a
    training step's tensors (those that record gradients): rank 0 validates alone, and must not wait for others."""
    if not active() or not tensor.requires_grad:
        return tensor
    return _SumOverRanks.apply(tensor)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with its gradient: every rank's loss uses the sum, so the gradient reaching each rank's
    share is the sum of the ranks' upstream gradients (DDP then divides by the number of ranks)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


def mean_over_ranks(value: float) -> float:
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


def sum_over_ranks(array):
    """Element-wise sum over the ranks of a NumPy array (e.g. confusion counts)."""
    if not active():
        return array
    tensor = torch.from_numpy(array.astype("float64"))
    dist.all_reduce(tensor)
    return tensor.numpy().astype(array.dtype)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a clock running out on one stops all at the same step)."""
    if not active():
        return flag
    tensor = torch.tensor([int(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor)


def from_main(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if active():
        dist.barrier()


def parameters_agree(model: torch.nn.Module) -> bool:
    """Whether every rank holds exactly the same parameters, bit for bit (a SHA-256 of each rank's). BatchNorm's
    running statistics are left out: on CPU each rank keeps its own (see the module's notes)."""
    import hashlib

    if not active():
        return True
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


def launch(argv: list[str], nproc: int) -> int:
    """Run `medseg` with `argv` on `nproc` processes of this machine under torchrun; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "medseg", *argv]
    return subprocess.call(command)
