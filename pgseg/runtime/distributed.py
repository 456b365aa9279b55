"""Everything that touches ``torch.distributed``. Each helper answers for a single process when no group exists."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch
import torch.distributed as dist

__all__ = ['init_distributed', 'stop_with_launcher', 'is_distributed', 'get_rank', 'get_world_size', 'is_main_process',
           'all_gather_with_grad', 'broadcast_flag', 'all_ranks_true', 'all_ranks_true_tensor', 'all_reduce_mean',
           'all_reduce_sum',
           'barrier', 'all_gather_object', 'all_reduce_grads_mean', 'destroy_process_group']


def init_distributed() -> tuple[torch.device, int]:
    """Start the process group when launched by torchrun; returns (device, local rank). A rank started by torchrun
    stops the moment its launcher dies (:func:`stop_with_launcher`)."""
    stop_with_launcher()
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not dist.is_initialized():
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        return torch.device('cuda', local_rank), local_rank
    local_world = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # no oversubscription of CPU cores
    return torch.device('cpu'), local_rank


def stop_with_launcher() -> None:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set), ask Linux to kill this process when its launcher dies
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): after a ``kill -9`` of torchrun its ranks would otherwise go on training
    and checkpointing beside a relaunched run. Checkpoints are written atomically, so a rank killed mid-write leaves
    only a temporary, which the next run removes. Elsewhere (no launcher, another OS) this does nothing."""
    if 'TORCHELASTIC_RUN_ID' not in os.environ or not sys.platform.startswith('linux'):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() == 1:  # the launcher died before the request took effect
        os._exit(1)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for this rank's slice.

    Works with every backend (gloo has no reduce-scatter): the backward all-reduces the full gradient and keeps
    this rank's rows. With DDP averaging the parameter gradients afterwards, the result equals the gradient of
    one process computing the loss on the concatenated batch (tested in tests/test_distributed.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # never modify the incoming gradient in place
        if dist.get_backend() == 'nccl':
            out = torch.empty_like(grad[:ctx.rows])
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from all ranks in rank order -> [W*B, ...], with gradients back to each rank."""
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def _flag_device() -> torch.device:
    """Where a small collective tensor must live: NCCL groups only take CUDA tensors."""
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def broadcast_flag(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s decision, on every rank (e.g. to stop a run at the same step everywhere)."""
    return bool(broadcast_int(int(flag), src))


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s integer, on every rank."""
    if get_world_size() == 1:
        return value
    t = torch.tensor([int(value)], dtype=torch.int64, device=_flag_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def all_ranks_true(flag: bool) -> bool:
    """True only if ``flag`` is True on every rank."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@torch.no_grad()
def all_ranks_true_tensor(flag: torch.Tensor) -> torch.Tensor:
    """Device-side :func:`all_ranks_true`: a 0-dim bool tensor, True only where every rank's is True. No host
    synchronisation (on NCCL the all-reduce is enqueued on the stream)."""
    if get_world_size() == 1:
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor; ``x`` is left untouched)."""
    if get_world_size() == 1:
        return x.clone()
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / get_world_size()


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, on ``x``'s device (a new tensor; ``x`` is left untouched). The reduction itself runs
    where the backend can take it: NCCL only reduces CUDA tensors, so a CPU tensor (a confusion matrix, a count)
    travels to this rank's GPU and back."""
    if get_world_size() == 1:
        return x.clone()
    y = x.to(_flag_device(), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads_mean(params) -> None:
    """Average the gradients of ``params`` over ranks in place, as one flat all-reduce (a parameter without a
    gradient counts as zeros). For a few trainable tensors outside DDP (MVP-SEG's prompts)."""
    if not is_distributed():
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def destroy_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()
