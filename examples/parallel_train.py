"""Train one FusedMLP three ways and get the same model: on one process, tensor
parallel, and data parallel.

    python examples/parallel_train.py --mode single
    torchrun --standalone --nproc-per-node 2 examples/parallel_train.py --mode tensor
    torchrun --standalone --nproc-per-node 2 examples/parallel_train.py --mode data

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. The backend is nccl when every rank has a GPU of
its own, gloo (CPU) otherwise; the code is the same. Every mode sees the same
global batches (the same seed everywhere), so the printed losses agree to
rounding.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import mlp_ext
from mlp_ext.parallel import TensorParallelFusedMLP


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["single", "tensor", "data"], default="single")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="examples per step, over all ranks")
    args = parser.parse_args()

    rank, world = 0, 1
    device = torch.device("cpu")
    if args.mode != "single":
        local_rank = int(os.environ["LOCAL_RANK"])
        world = int(os.environ["WORLD_SIZE"])
        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
        if use_cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        if args.mode == "data" and args.batch % world:
            parser.error(f"--batch {args.batch} must be a multiple of the {world} ranks for equal shares")

    # A toy task: 4 classes of points in 20 dimensions, labelled by a random teacher.
    data = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 20, generator=data)
    Y = (X @ torch.randn(20, 4, generator=data)).argmax(1)
    X, Y = X.to(device), Y.to(device)

    torch.manual_seed(0)  # the same initial model on every rank
    model = mlp_ext.FusedMLP(20, 256, 4, activation="gelu", weight_decay=1e-4, device=device)
    if args.mode == "tensor":
        model = TensorParallelFusedMLP.from_fused(model)  # this rank's hidden units only
    elif args.mode == "data":
        model = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    for step in range(args.steps):
        batch = torch.randint(0, len(X), (args.batch,), generator=data).to(device)
        if args.mode == "data":  # each rank takes its equal share of the batch
            batch = batch.chunk(world)[rank]
        o, s = model(X[batch], return_penalty=True)
        loss = F.cross_entropy(o, Y[batch]) + s  # J = L + s; DDP averages L's gradient over ranks
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            if args.mode == "data":  # the loss of the whole batch is the mean over ranks
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            if rank == 0:
                print(f"[{args.mode}, {world} rank(s)] step {step:4d}  J = {loss.item():.6f}")

    if args.mode == "tensor":
        model = model.to_fused()  # the whole model again, on every rank
    elif args.mode == "data":
        model = model.module
    with torch.no_grad():
        accuracy = (model(X).argmax(1) == Y).float().mean().item()
    if rank == 0:
        print(f"[{args.mode}] training accuracy {accuracy:.4f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
