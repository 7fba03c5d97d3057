"""Tensor parallel vs data parallel FusedMLP: per-rank memory and communication.

For a few layer sizes (n examples per step in all, in -> hidden -> out) and P
ranks, the per-rank bytes of

* parameters (gradients take as much again, Adam's state twice as much),
* activations saved for the backward (what the fused operator keeps: x, Z, H),
* all_reduce payload per training step, and the bytes a rank sends in a ring
  all_reduce of it, 2 (P-1)/P x payload,

for tensor parallel (mlp_ext.parallel.TensorParallelFusedMLP: the hidden layer
split, the whole batch on every rank) and data parallel
(DistributedDataParallel(FusedMLP): the whole layer on every rank, n/P
examples each). The numbers come from formulas and, for the sizes that fit
this machine, are checked against a real step on P gloo processes: saved
tensors counted with torch.autograd.graph.saved_tensors_hooks, all_reduce
payloads counted by wrapping torch.distributed.all_reduce (tensor parallel)
and by a DDP communication hook (data parallel).

    python benchmarks/parallel_tradeoff.py                  # P = 2, float32
    python benchmarks/parallel_tradeoff.py --world-size 4 --dtype bfloat16 --no-measure

Prints a Markdown table and writes JSON to benchmarks/results/.
"""
import argparse
import functools
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import mlp_ext
from mlp_ext.parallel import TensorParallelFusedMLP, run_local, shard_sizes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
from common import saved_bytes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "parallel_tradeoff.json")

# (name, n = examples per step over all ranks, in, hidden, out)
SIZES = [
    ("D2L MNIST MLP", 256, 784, 256, 10),
    ("small layer, large batch", 16384, 256, 1024, 256),
    ("wide layer, small batch", 64, 1024, 16384, 1024),
    ("GPT-3 FFN, 2048 tokens", 2048, 12288, 49152, 12288),
]
MEASURE_LIMIT = 50_000_000  # measure sizes whose layer has at most this many parameters


@dataclass
class Cost:
    """Per-rank bytes of one training step (the largest over the ranks)."""
    parameters: int
    saved_activations: int
    all_reduce_payload: int


def analytic(mode: str, n: int, d: int, h: int, q: int, world: int, itemsize: int) -> Cost:
    """The formulas. Tensor parallel: rank r holds h_r hidden units of the
    layer (the largest h_r is ceil(h/P)) and b2, and sees all n examples; its
    forward all_reduces o and s (n q + 1 numbers), its backward dx (n d).
    Data parallel: every rank holds the whole layer and n/P examples, and
    all_reduces every gradient once per step."""
    if mode == "tensor parallel":
        h_r, n_r = max(shard_sizes(h, world)), n
        parameters = h_r * d + h_r + q * h_r + q
        payload = (n * q + 1) + n * d
    else:
        h_r, n_r = h, math.ceil(n / world)
        parameters = h * d + h + q * h + q
        payload = parameters
    saved = n_r * d + 2 * n_r * h_r  # x, and Z and H (n_r x h_r each)
    return Cost(parameters * itemsize, saved * itemsize, payload * itemsize)


def ring_bytes_sent(payload: int, world: int) -> int:
    """Bytes each rank sends in a ring all_reduce (reduce-scatter + all-gather)."""
    return 2 * (world - 1) * payload // world


# ---------------------------------------------------------------------------
# Measurement, inside each rank
# ---------------------------------------------------------------------------

def _saved_activation_bytes(module, x, parameters):
    """(bytes of the distinct non-parameter storages autograd saves in module(x), its output)."""
    out, size = saved_bytes(functools.partial(module, x, return_penalty=True), exclude=parameters)
    return size, out


def _measure_rank(rank: int, world: int, sizes: List[tuple], dtype_name: str) -> List[dict]:
    dtype = getattr(torch, dtype_name)
    rows = []
    for name, n, d, h, q in sizes:
        torch.manual_seed(0)
        mlp = mlp_ext.FusedMLP(d, h, q, weight_decay=1e-4, dtype=dtype)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(n, d, dtype=dtype, generator=generator)
        y = torch.randint(0, q, (n,), generator=generator)

        # Tensor parallel: the whole batch on every rank; x requires grad as it
        # would inside a network (a first layer on raw data skips dx's all_reduce).
        tp = TensorParallelFusedMLP.from_fused(mlp)
        payload = 0
        original = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            nonlocal payload
            payload += tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            xt = x.clone().requires_grad_()
            saved, (o, s) = _saved_activation_bytes(tp, xt, list(tp.parameters()))
            (F.cross_entropy(o, y) + s).backward()
        finally:
            dist.all_reduce = original
        params = sum(p.numel() * p.element_size() for p in tp.parameters())
        rows.append(dict(size=name, mode="tensor parallel", parameters=params, saved_activations=saved,
                         all_reduce_payload=payload))
        del tp, xt, o, s

        # Data parallel: rank r's own slice of the batch (its own memory, as a
        # data loader would give it), the whole layer.
        ddp = DistributedDataParallel(mlp)
        bucket_bytes = [0]

        def counting_hook(state, bucket):
            state[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(bucket_bytes, counting_hook)
        mine = slice(*[min(n, r * math.ceil(n / world)) for r in (rank, rank + 1)])
        xd = x[mine].clone().requires_grad_()
        saved, (o, s) = _saved_activation_bytes(ddp, xd, list(mlp.parameters()))
        (F.cross_entropy(o, y[mine]) + s).backward()
        params = sum(p.numel() * p.element_size() for p in mlp.parameters())
        rows.append(dict(size=name, mode="data parallel", parameters=params, saved_activations=saved,
                         all_reduce_payload=bucket_bytes[0]))
        del ddp, mlp, xd, o, s
    return rows


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="number of ranks P (default 2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"],
                        help="parameter/activation dtype (measured only for float32 and float64)")
    parser.add_argument("--no-measure", action="store_true", help="formulas only, start no processes")
    parser.add_argument("--out", default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    world, itemsize = args.world_size, torch.empty((), dtype=getattr(torch, args.dtype)).element_size()

    measurable = [s for s in SIZES if s[3] * (s[2] + s[4] + 1) + s[4] <= MEASURE_LIMIT]
    measured: Dict[tuple, dict] = {}
    if not args.no_measure and args.dtype in ("float32", "float64") and measurable:
        per_rank = run_local(_measure_rank, world, args=(measurable, args.dtype), timeout=600)
        for rows in per_rank:  # the largest over the ranks
            for row in rows:
                key = (row["size"], row["mode"])
                old = measured.setdefault(key, row)
                for field in ("parameters", "saved_activations", "all_reduce_payload"):
                    old[field] = max(old[field], row[field])

    rows, mismatches = [], []
    for name, n, d, h, q in SIZES:
        for mode in ("tensor parallel", "data parallel"):
            cost = analytic(mode, n, d, h, q, world, itemsize)
            row = dict(size=name, n=n, d=d, h=h, q=q, mode=mode, **asdict(cost),
                       ring_bytes_sent=ring_bytes_sent(cost.all_reduce_payload, world))
            m = measured.get((name, mode))
            row["measured"] = None if m is None else {k: m[k] for k in asdict(cost)}
            if m is not None and row["measured"] != asdict(cost):
                mismatches.append((name, mode, asdict(cost), row["measured"]))
            rows.append(row)

    print(f"Per rank, P = {world} ranks, {args.dtype}; n = examples per step over all ranks; "
          "all_reduce payload per training step (tensor parallel: o and s forward, dx backward; "
          "data parallel: all gradients); sent = ring all_reduce, 2(P-1)/P x payload.\n")
    print("| layer (n, in, hidden, out) | mode | parameters | saved activations | all_reduce payload "
          "| sent per rank | checked on a real step |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        check = "-" if row["measured"] is None else ("yes, equal" if row["measured"] == {
            k: row[k] for k in ("parameters", "saved_activations", "all_reduce_payload")} else "MISMATCH")
        print(f"| {row['size']} ({row['n']}, {row['d']}, {row['h']}, {row['q']}) | {row['mode']} "
              f"| {human(row['parameters'])} | {human(row['saved_activations'])} "
              f"| {human(row['all_reduce_payload'])} | {human(row['ring_bytes_sent'])} | {check} |")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(world_size=world, dtype=args.dtype, torch=torch.__version__,
                       machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
                       cpu_count=os.cpu_count(), rows=rows), f, indent=1)
    print(f"\nwritten to {args.out}")
    for name, mode, want, got in mismatches:
        print(f"MISMATCH {name} / {mode}: formula {want}, measured {got}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
