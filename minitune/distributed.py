"""Distributed training as transforms applied to a plain model from outside.

Launch with torchrun (`--nproc_per_node N`, and `--nnodes`/rendezvous for several nodes); the
process group is read from torchrun's environment. gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import functools
import gc
import math
import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minitune.errors import MinituneError
from minitune.heads import base_model


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Joins torchrun's process group when launched by torchrun; else a single process."""
    if "RANK" not in os.environ or dist.is_initialized():
        if dist.is_initialized():
            return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device)
        return DistInfo(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def sharded(model: nn.Module) -> bool:
    """True when `model` holds FSDP2-sharded parameters under a process group of several ranks: each of its
    forwards all-gathers parameters with every other rank, so all ranks must run as many forwards (a rank
    that stops early leaves the others waiting in their next all-gather)."""
    if world_size() == 1:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on every rank (one process: `flag`)."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_max(torch.tensor([0 if flag else 1], device=device)).item() == 0)


def in_step(batches, model: nn.Module, device: torch.device):
    """Yields (batch, counts) for an evaluation over this rank's share of the data. Under FSDP2 every forward
    all-gathers parameters with all ranks, so when this rank's batches end before another rank's, it runs its
    last batch again (counts=False: compute, then leave it out) until all ranks are done; ranks decide together
    after every batch. Without sharding it yields each batch once with counts=True."""
    if not sharded(model):
        for b in batches:
            yield b, True
        return
    it, last = iter(batches), None
    while True:
        b = next(it, None)
        if all_ranks(b is None, device):
            return
        if b is None and last is None:
            raise MinituneError(f"rank {dist.get_rank()} has no held-out batch while other ranks do: the held-out split "
                                f"has fewer items than ranks; give it at least {world_size()} or run on fewer ranks")
        if b is None:
            yield last, False
        else:
            last = b
            yield b, True


def std_over_ranks(x: torch.Tensor) -> float:
    """The (unbiased) standard deviation of the values every rank holds in `x`, pooled as one tensor."""
    t = all_reduce_sum(torch.stack([torch.tensor(float(x.numel())), x.double().sum().cpu(), x.double().square().sum().cpu()])
                       .to(x.device))
    n, total, squares = t.tolist()
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0


def metrics_over_ranks(stats: dict[str, float], device: torch.device, *, summed=(), largest=()) -> dict[str, float]:
    """A step's metrics for the whole job rather than rank 0's share (one process: unchanged). Keys in `summed`
    are added over the ranks (counts, throughputs), keys in `largest` take the largest value (durations: the
    step waits for its slowest rank), the rest are means over the ranks that measured them (a NaN is "not
    measured here"): the means of quantities every rank measures over as many rows (rollouts of one size).
    Every rank must pass the same keys, in any order; a mismatch raises rather than mixing up metrics."""
    if world_size() == 1:
        return dict(stats)
    keys = sorted(stats)
    names = zlib.crc32("\n".join(keys).encode())
    agree = all_reduce_max(torch.tensor([names, -names], dtype=torch.int64, device=device))
    if agree[0] != -agree[1]:
        raise MinituneError(f"ranks logged different metrics (rank {dist.get_rank()}: {', '.join(keys)}): each rank must "
                            f"log the same names, a NaN where it measured nothing")
    vals = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    seen = torch.isfinite(vals)
    sums = all_reduce_sum(torch.stack([torch.where(seen, vals, 0.0), seen.double()]))
    top = all_reduce_max(torch.where(seen, vals, -torch.inf))
    out = {}
    for i, k in enumerate(keys):
        if sums[1, i] == 0:
            out[k] = float("nan")
        elif k in summed:
            out[k] = sums[0, i].item()
        elif k in largest:
            out[k] = top[i].item()
        else:
            out[k] = (sums[0, i] / sums[1, i]).item()
    return out


def cleanup(*wrapped: nn.Module) -> None:
    """Ends the process group. Pass the DDP-wrapped models: their reducers are released first, while
    every rank is still here. A reducer freed after `destroy_process_group` holds the last reference
    to the gloo group, whose destructor can then wait forever on threads of a peer that has exited
    (seen as a rank that never exits after its run finished)."""
    if not dist.is_initialized():
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.barrier()
    for m in wrapped:
        if isinstance(m, DDP):
            for attr in ("logger", "reducer"):
                if hasattr(m, attr):
                    delattr(m, attr)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wraps in DistributedDataParallel; only parameters that require grad (LoRA) are synced."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def fsdp_runs_on(device: torch.device) -> bool:
    """FSDP2 records and waits on events of its streams; torch's CPU streams gained those in torch 2.7
    (pytorch#145935): before, FSDP2 on CPU fails at its first forward."""
    return device.type != "cpu" or hasattr(torch.cpu.Stream, "record_event")


def check_parallel(parallel: str, info: DistInfo) -> None:
    """Refuses a parallel mode this torch cannot run here, before any model loads."""
    if parallel == "fsdp" and info.world_size > 1 and not fsdp_runs_on(info.device):
        raise MinituneError(f"run.parallel=fsdp on CPU needs torch >= 2.7 (this is {torch.__version__}, whose FSDP2 "
                            "has no CPU support): use run.parallel=ddp, or a newer torch")


def apply_fsdp(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: `fully_shard` each decoder block, then the root (the model, or a `WithHead` around it). For a 4-bit base, the packed weights
    must be stored in the dtype FSDP uses (`quant_storage`), or FSDP's casts corrupt the bytes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype) if param_dtype is not None else MixedPrecisionPolicy()
    sharded = [*base_model(model).model.layers, model]
    for module in sharded:
        fully_shard(module, mesh=mesh, mp_policy=mp)
    if reduce_scatter_avg_sums(info.device):
        # FSDP2 averages fp32/bf16 gradients with one AVG reduce-scatter; where that returns the sum, the
        # hook (run on the reduce-scatter output, before the gradients are viewed out of it) divides.
        if not hasattr(model, "set_all_reduce_hook"):
            raise MinituneError(f"FSDP2 in torch {torch.__version__} sums gradients on {info.device.type} instead of "
                                "averaging them: use run.parallel=ddp, or a newer torch")
        for module in sharded:
            module.set_all_reduce_hook(functools.partial(torch.Tensor.div_, other=info.world_size))
    return model


def reduce_scatter_avg_sums(device: torch.device) -> bool:
    """Whether an AVG reduce-scatter of tensors on `device` over the default process group comes back as the
    sum: gloo (CPU) did that silently in torch 2.7 (pytorch#162338), where FSDP2 uses it to average gradients.
    A one-number probe."""
    n = world_size()
    if n == 1:
        return False
    out = torch.zeros(1, device=device)
    dist.reduce_scatter_tensor(out, torch.full((n,), float(dist.get_rank() + 1), device=device), op=dist.ReduceOp.AVG)
    return abs(out.item() - (n + 1) / 2) > 1e-6  # the mean of 1..n, not their sum


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a (possibly sharded) DTensor; every rank must call it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if hasattr(model, "module") and not hasattr(model, "config") else model
