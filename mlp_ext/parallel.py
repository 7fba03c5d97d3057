"""FusedMLP on more than one device, with PyTorch's own torch.distributed.

Tensor parallel (Megatron-LM style): the hidden layer is split across the ranks
of a process group. Rank r holds rows [lo_r, hi_r) of W1 and b1 and the same
columns of W2, and runs the fused operator on the full (replicated) input::

    o_r, s_r = fused_mlp(x, W1[lo:hi], W2[:, lo:hi], b1[lo:hi])   # local, no b2
    o = sum_r o_r + b2          s = sum_r s_r                     # one all_reduce

The sum is exact: o = phi(X W1^T + b1) W2^T + b2 splits over the hidden units,
and so does s = lambda/2 (||W1||^2 + ||W2||^2). The backward is local except
for the input gradient dX = sum_r G_Z,r W1_r, which takes one all_reduce.

Data parallel needs nothing from this module: ``DistributedDataParallel(FusedMLP(...))``
trains exactly like one process on the concatenated batch (see the README).

PyTorch's own tensor parallelism works on FusedMLP unchanged too:
``parallelize_module(mlp, mesh, {"fc1": ColwiseParallel(), "fc2":
RowwiseParallel()})`` makes the weights DTensors, and the ops' sharding rules
(mlp_ext/_dtensor.py, registered when this module is imported or on the first
DTensor call) let DTensor run the same split; FSDP2's ``fully_shard`` needs
nothing. TensorParallelFusedMLP stays as the explicit form of the split on a
process group, for what DTensor cannot do: ranks holding no hidden units
(tensor_split sizes; DTensor's chunk layout needs hidden >= ranks) and o and s
reduced in one all_reduce (DTensor reduces each Partial output on its own).
See docs/parallel.md for which to use when.

``run_local`` starts a process group of spawned processes on this machine
(loopback only), for trying either mode without a launcher and for the tests.
"""
import datetime
import faulthandler
import gc
import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from . import _dtensor
from .functional import fused_mlp
from .modules import FusedMLP

# DTensor's sharding rules for the ops: whoever imports this module is about to
# go distributed (registering costs nothing at call time afterwards).
_dtensor.register()

__all__ = [
    "TensorParallelFusedMLP",
    "run_local",
    "shard_range",
    "shard_sizes",
    "tensor_parallel_fused_mlp",
]


# ---------------------------------------------------------------------------
# How the hidden units are split
# ---------------------------------------------------------------------------

def shard_sizes(hidden_features: int, world_size: int) -> List[int]:
    """Hidden units per rank: as even as possible, the first ``hidden % world``
    ranks holding one more (the sizes of ``torch.tensor_split``, not of
    ``torch.chunk``, which can leave ranks without a part). With fewer hidden
    units than ranks, the last ranks hold none and contribute zeros."""
    if world_size < 1:
        raise ValueError(f"shard_sizes: expected world_size >= 1, got {world_size}")
    if hidden_features < 0:
        raise ValueError(f"shard_sizes: expected hidden_features >= 0, got {hidden_features}")
    base, extra = divmod(hidden_features, world_size)
    return [base + (r < extra) for r in range(world_size)]


def shard_range(hidden_features: int, rank: int, world_size: int) -> Tuple[int, int]:
    """The hidden units [start, stop) that ``rank`` holds."""
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_range: expected 0 <= rank < world_size = {world_size}, got rank {rank}")
    sizes = shard_sizes(hidden_features, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# ---------------------------------------------------------------------------
# Megatron's conjugate pair f (copy in, reduce gradients) and g (reduce out,
# copy gradients). Each one's backward is the other one, so second derivatives
# (create_graph=True) are right as well. Convention: whatever comes after g is
# computed identically on every rank, and the gradients are those of one copy
# of that loss.
# ---------------------------------------------------------------------------

def _all_reduce_packed(tensors: Sequence[Tensor], group) -> List[Tensor]:
    """Sums of each tensor over the group, as new tensors; tensors of one dtype
    share one all_reduce (o and s travel together)."""
    out: List[Optional[Tensor]] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        if len(idx) == 1:
            buffer = tensors[idx[0]].clone(memory_format=torch.contiguous_format)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
            out[idx[0]] = buffer
            continue
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        # Copies, not views of `flat`: autograd forbids in-place changes to
        # several views returned by one Function, and users may make them.
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view(tensors[i].shape).clone()
    return out  # type: ignore[return-value]


class _CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward (the input is already on every rank); the backward
    sums the rank-local gradients."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_ReduceFromTensorParallel.apply(ctx.group, *grads))


class _ReduceFromTensorParallel(torch.autograd.Function):
    """g: sums the rank-local partial results; the backward passes the gradient
    of the replicated result to every rank's part unchanged."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(_all_reduce_packed(tensors, group))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_CopyToTensorParallel.apply(ctx.group, *grads))


def tensor_parallel_fused_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    weight_decay: float = 0.0,
    group: Optional[dist.ProcessGroup] = None,
) -> Tuple[Tensor, Tensor]:
    """``fused_mlp`` with the hidden layer split over the ranks of ``group``.

    Args:
        x: (*, in_features), the same on every rank.
        w1: (h_r, in_features), this rank's rows of W1;  b1: (h_r,) or None.
        w2: (out_features, h_r), the matching columns of W2.
        b2: (out_features,) or None, the same on every rank.
        group: the process group (None: the default one).

    Returns:
        (o, s) of the whole layer, the same on every rank: one all_reduce in the
        forward, and one in the backward when x requires grad (for dx).
    """
    (x,) = _CopyToTensorParallel.apply(group, x)
    o, s = fused_mlp(x, w1, w2, b1, None, activation=activation, weight_decay=weight_decay)
    # Why s is reduced: each rank's s_r depends only on its own shard, so
    # dJ/dW_r = dL/dW_r + g_s lambda W_r needs nothing from other ranks, and g
    # hands g_s to every s_r unchanged. But the *value* of J = L + s must be the
    # whole s on every rank; it rides in o's all_reduce (one more element).
    o, s = _ReduceFromTensorParallel.apply(group, o, s)
    if b2 is not None:
        o = o + b2  # once, after the sum
    return o, s


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------

def _linear(weight: Tensor, bias: Optional[Tensor], requires_grad: bool = True) -> nn.Linear:
    """An nn.Linear whose parameters are the given tensors (no initialization)."""
    with torch.device("meta"):
        linear = nn.Linear(1, 1, bias=bias is not None)
    linear.out_features, linear.in_features = weight.shape
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return linear


def _fingerprint(mlp: FusedMLP) -> Tuple:
    """Cheap summary of the full model, equal on ranks that hold the same one."""
    sums = tuple((p.detach().double().sum().item(), p.detach().double().square().sum().item())
                 for p in mlp.parameters())
    return (mlp.in_features, mlp.hidden_features, mlp.out_features, mlp.activation,
            mlp.weight_decay, mlp.fc1.bias is not None, str(mlp.fc1.weight.dtype), sums)


class TensorParallelFusedMLP(nn.Module):
    """A FusedMLP whose hidden layer is split across the ranks of a process group.

    Rank r holds ``fc1.weight`` = W1[lo:hi], ``fc1.bias`` = b1[lo:hi],
    ``fc2.weight`` = W2[:, lo:hi] and the whole ``fc2.bias`` = b2 (replicated),
    with [lo, hi) = ``shard_range(hidden_features, r, world_size)``: the same
    parameter names as FusedMLP, holding this rank's shard. ``forward(x,
    return_penalty=False)`` takes the same x on every rank and returns the
    whole o (and s) on every rank, equal to the single-device FusedMLP.

    Build it from a FusedMLP that every rank holds (same seed or same
    checkpoint) with ``from_fused``; ``to_fused`` gathers the full FusedMLP back.
    All three (and the constructor) are collectives: call them on every rank.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        *,
        activation: str = "relu",
        bias: bool = True,
        weight_decay: float = 0.0,
        group: Optional[dist.ProcessGroup] = None,
        device=None,
        dtype=None,
    ) -> None:
        """Initializes like ``FusedMLP(...)`` with the same arguments and random
        state would (so seed every rank alike), keeping only this rank's shard.
        The full layer exists for a moment; for one that fits nowhere, build the
        FusedMLP on the CPU and use ``from_fused(mlp, device=...)``."""
        super().__init__()
        full = FusedMLP(in_features, hidden_features, out_features, activation=activation, bias=bias,
                        weight_decay=weight_decay, device=device, dtype=dtype)
        self._take_shard(full, group, device=None)

    @classmethod
    def from_fused(cls, mlp: FusedMLP, group: Optional[dist.ProcessGroup] = None, *,
                   device=None) -> "TensorParallelFusedMLP":
        """This rank's shard of ``mlp`` (copied; ``mlp`` is left as it is) on
        ``device`` (default: mlp's). Every rank of ``group`` must pass the same
        ``mlp``: checked with one small collective, ValueError on every rank if not."""
        if not isinstance(mlp, FusedMLP):
            raise TypeError(f"TensorParallelFusedMLP.from_fused: expected a mlp_ext.FusedMLP, "
                            f"got {type(mlp).__name__}")
        tp = cls.__new__(cls)
        nn.Module.__init__(tp)
        tp._take_shard(mlp, group, device)
        return tp

    def _take_shard(self, mlp: FusedMLP, group, device) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TensorParallelFusedMLP: torch.distributed is not initialized; "
                               "call torch.distributed.init_process_group first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError(f"TensorParallelFusedMLP: this process (global rank {dist.get_rank()}) is not "
                             "a member of the given group")
        fingerprints = [None] * self.world_size
        dist.all_gather_object(fingerprints, _fingerprint(mlp), group=group)
        if any(f != fingerprints[0] for f in fingerprints):
            differ = [r for r, f in enumerate(fingerprints) if f != fingerprints[0]]
            raise ValueError(
                "TensorParallelFusedMLP: the FusedMLP to shard differs between ranks (group ranks "
                f"{differ} differ from rank 0); build it from the same seed or checkpoint on every rank")
        self.in_features, self.hidden_features, self.out_features = (
            mlp.in_features, mlp.hidden_features, mlp.out_features)
        self.activation, self.weight_decay = mlp.activation, mlp.weight_decay
        self.hidden_range = shard_range(mlp.hidden_features, self.rank, self.world_size)
        lo, hi = self.hidden_range
        device = mlp.fc1.weight.device if device is None else torch.device(device)
        requires_grad = mlp.fc1.weight.requires_grad

        def part(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.detach().to(device, copy=True, memory_format=torch.contiguous_format)

        b1 = None if mlp.fc1.bias is None else mlp.fc1.bias[lo:hi]
        self.fc1 = _linear(part(mlp.fc1.weight[lo:hi]), part(b1), requires_grad)
        self.fc2 = _linear(part(mlp.fc2.weight[:, lo:hi]), part(mlp.fc2.bias), requires_grad)  # b2 whole

    def forward(self, x: Tensor, return_penalty: bool = False):
        o, s = tensor_parallel_fused_mlp(
            x, self.fc1.weight, self.fc2.weight, self.fc1.bias, self.fc2.bias,
            activation=self.activation, weight_decay=self.weight_decay, group=self.group)
        return (o, s) if return_penalty else o

    @torch.no_grad()
    def to_fused(self) -> FusedMLP:
        """The full FusedMLP (new parameters, on this shard's device), gathered on
        every rank with one all_gather."""
        sizes = shard_sizes(self.hidden_features, self.world_size)
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        # Row k of the shard holds everything hidden unit k owns: [W1 row | b1 | W2 column].
        rows = torch.cat([w1] + ([b1[:, None]] if b1 is not None else []) + [w2.t()], dim=1)
        padded = rows.new_zeros(max(sizes), rows.shape[1])  # all_gather wants equal sizes
        padded[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        full = torch.cat([g[:n] for g, n in zip(gathered, sizes)])
        d = self.in_features
        full_w1 = full[:, :d].contiguous()
        full_b1 = full[:, d].contiguous() if b1 is not None else None
        full_w2 = full[:, d + (b1 is not None):].t().contiguous()
        mlp = FusedMLP(self.in_features, self.hidden_features, self.out_features, activation=self.activation,
                       bias=b1 is not None, weight_decay=self.weight_decay, device="meta", dtype=w1.dtype)
        mlp.fc1 = _linear(full_w1, full_b1, w1.requires_grad)
        mlp.fc2 = _linear(full_w2, None if b2 is None else b2.clone(), w1.requires_grad)
        return mlp

    def extra_repr(self) -> str:
        lo, hi = self.hidden_range
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features} "
                f"(this rank: [{lo}, {hi}) of rank {self.rank}/{self.world_size}), "
                f"out_features={self.out_features}, activation={self.activation!r}, "
                f"bias={self.fc1.bias is not None}, weight_decay={self.weight_decay}")


# ---------------------------------------------------------------------------
# A process group on this machine, without a launcher
# ---------------------------------------------------------------------------

def _run_rank(rank: int, fn, args, world_size: int, port: int, backend: str, timeout: float,
              threads: int, result_dir: str) -> None:
    # A native crash (an abort in a C++ thread, a segfault) raises no Python
    # exception: dump every thread's Python stack where run_local reports it.
    crash_log = open(os.path.join(result_dir, f"rank{rank}.crash"), "w")
    faulthandler.enable(crash_log, all_threads=True)
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    wait = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=wait)
    outcome = {}

    def all_ranks_at(step: str, block: bool) -> None:
        store.set(f"{step}/{rank}", "1")
        if block:
            store.wait([f"{step}/{r}" for r in range(world_size)])

    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=wait)
        outcome["result"] = fn(rank, world_size, *args)
    except BaseException:
        outcome.update(error=traceback.format_exc(), time=time.time())
        raise
    finally:
        with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(outcome, f)
        # The teardown is ordered so that no C++ thread of the process group
        # outlives it: a rank that closes its sockets while a peer still talks
        # to it, or a group (or a tensor queued on its worker threads) freed
        # during interpreter shutdown, takes the process down with SIGABRT
        # instead of an exception. A failed rank leaves at once.
        ok = "error" not in outcome
        all_ranks_at("finished", block=ok)
        # Objects fn left in reference cycles (modules, autograd graphs,
        # DDP's reducer) may hold the group or tensors: free them now, while
        # the group and the interpreter are alive.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
        all_ranks_at("left", block=ok)
        # faulthandler stays on (it holds crash_log) through interpreter shutdown.


def run_local(fn: Callable[..., Any], world_size: int, args: Sequence = (), *, backend: str = "gloo",
              timeout: float = 120.0, threads_per_rank: Optional[int] = None) -> List[Any]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes
    that form the default process group over loopback (127.0.0.1, a port the OS
    picks), and returns their return values, by rank.

    ``fn`` must be picklable (a module-level function) and so must its result.
    Each process uses ``threads_per_rank`` threads (default: the CPU cores
    shared out). Collectives time out after ``timeout`` seconds, and so does
    the whole run (TimeoutError; the processes are killed). If ranks raise,
    RuntimeError names the rank that failed first, with its traceback.
    """
    if world_size < 1:
        raise ValueError(f"run_local: expected world_size >= 1, got {world_size}")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    name = getattr(fn, "__name__", repr(fn))
    # The parent hosts the rendezvous store on a port the OS picks: no race for a free port.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix="mlp_ext_run_local_") as result_dir:

        def outcomes() -> dict:
            found = {}
            for rank in range(world_size):
                path = os.path.join(result_dir, f"rank{rank}.pkl")
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        found[rank] = pickle.load(f)
            return found

        def crash_logs() -> str:
            """The stacks faulthandler wrote for the ranks that crashed."""
            logs = []
            for rank in range(world_size):
                path = os.path.join(result_dir, f"rank{rank}.crash")
                if os.path.exists(path) and os.path.getsize(path):
                    with open(path) as f:
                        logs.append(f"rank {rank}:\n{f.read()}")
            return "\n".join(logs) or "(no stack was written)"

        context = mp.start_processes(
            _run_rank, args=(fn, tuple(args), world_size, store.port, backend, timeout, threads, result_dir),
            nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=10):
                if time.monotonic() >= deadline:
                    done = sorted(outcomes())
                    raise TimeoutError(f"run_local: {name} did not finish on {world_size} processes within "
                                       f"{timeout} s (ranks finished: {done})")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            failed = sorted((o["time"], rank, o["error"]) for rank, o in outcomes().items() if "error" in o)
            if not failed:  # died without a Python exception (a signal, os._exit)
                raise RuntimeError(f"run_local: {name} on {world_size} processes: {exc}\n{crash_logs()}") from exc
            _, rank, error = failed[0]
            also = [r for _, r, _ in failed[1:]]
            raise RuntimeError(
                f"run_local: {name} failed on rank {rank} of {world_size} first:\n{error}"
                + (f"(ranks {also} failed after it, usually because of it)" if also else "")) from exc
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [outcome["result"] for _, outcome in sorted(outcomes().items())]
