"""Data parallel training on ``torch.distributed``, started by ``torchrun``.

    torchrun --standalone --nproc_per_node N launch.py recipes.X ...          # one machine
    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d \\
             --rdzv_endpoint HOST:PORT launch.py recipes.X ...                  # M machines

Semantics: ``--data.batch-size`` is the GLOBAL batch; each of the W ranks takes a disjoint shard of
``batch_size / W`` images of every global batch (kd.data's rank shards), so the learning rate and every
schedule mean the same thing for any W. Each rank computes the mean loss of its shard; gradients are
averaged across ranks inside the pure train step with a functional (compile-traceable) all-reduce, so
the update equals the single-process update on the global batch. BatchNorm: by default each rank
normalises with its shard's statistics and the running statistics are averaged across ranks every step
(all ranks stay identical); ``--dist.sync-bn True`` normalises with the global batch's statistics
(:class:`SyncBatchNorm`), which makes W ranks compute exactly what one process computes. Evaluation
is sharded and the correct counts are summed. Rank 0 alone writes logs, checkpoints and reports;
the others wait at a barrier after every epoch, so reads after it see complete files.

gloo on CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``). When a rank dies, torchrun ends the
others; a rank that stops answering ends the job after ``--dist.timeout-s``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import tree as T


@dataclass(frozen=True)
class DistConfig:
    """Data parallelism (only used when started by torchrun)."""

    sync_bn: bool = False
    """Normalise BatchNorm with the global batch's statistics (all ranks), not each rank's shard."""
    timeout_s: int = 600
    """A collective that waits longer than this ends the job (a hung or dead rank)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD = World()


def world() -> World:
    """This process's place in the job (rank 0 of 1 when not started by torchrun)."""
    return _WORLD


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cfg: DistConfig, device: torch.device) -> World:
    """Join the process group torchrun describes in the environment (idempotent)."""
    global _WORLD
    if not launched_by_torchrun() or dist.is_initialized():
        return _WORLD
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    _WORLD = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _WORLD


def shutdown() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def barrier() -> None:
    if _WORLD.size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Inside the train step (functional collectives: traced by torch.compile, no host sync)


def mean_across_ranks(tree: T.Tree) -> T.Tree:
    """Average the floating leaves of ``tree`` over ranks with ONE all-reduce of a flat buffer (integer
    leaves, e.g. BatchNorm's counter, are identical on every rank and pass through)."""
    if _WORLD.size == 1:
        return tree
    from torch.distributed import _functional_collectives as fc

    flat = T.flatten(tree)
    floats = [k for k, v in flat.items() if v.is_floating_point()]
    if not floats:
        return tree
    buffer = torch.cat([flat[k].float().reshape(-1) for k in floats])
    reduced = fc.all_reduce(buffer, "sum", dist.group.WORLD) / _WORLD.size
    out, offset = dict(flat), 0
    for k in floats:
        n = flat[k].numel()
        out[k] = reduced[offset:offset + n].view_as(flat[k]).to(flat[k].dtype)
        offset += n
    return T.fill(tree, out)


def sum_across_ranks(value: Tensor) -> Tensor:
    """Host-side sum of a small tensor over ranks (evaluation counts)."""
    if _WORLD.size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


# ----------------------------------------------------------------------------------------------
# Synchronised BatchNorm that works on CPU (gloo) and CUDA, under torch.func.functional_call


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch (sum, sum of squares and count
    all-reduced, differentiably); same parameter and buffer names as ``nn.BatchNorm1d/2d``, so
    checkpoints are interchangeable. Eval mode is plain BatchNorm with the running statistics."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"SyncBatchNorm expects 2-D or 4-D input, got {input.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or _WORLD.size == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] if x.dim() == 2 else [0, 2, 3]
        shape = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
        xf = x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                           torch.full((1,), x.numel() / x.shape[1], device=x.device)])
        total = all_reduce(local)  # autograd-aware: the backward all-reduces the gradient too
        c = x.shape[1]
        count = total[2 * c]
        mean = total[:c] / count
        var = total[c:2 * c] / count - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach() * m)
            self.running_var.mul_(1 - m).add_(var.detach() * (count / (count - 1)) * m)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d of ``module`` (in place) by :class:`SyncBatchNorm`."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, SyncBatchNorm):
            sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats).to(next(iter(child.state_dict().values())).device)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_bn(child)
    return module


__all__ = ["DistConfig", "World", "world", "init", "shutdown", "barrier", "mean_across_ranks",
           "sum_across_ranks", "SyncBatchNorm", "convert_sync_bn"]
