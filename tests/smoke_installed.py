"""The smoke test of an installed mlp_ext: a plain script (no pytest, no test
helpers), copied next to nothing and run with the interpreter that has the package,
from outside the source tree.

    python smoke_installed.py [--source-root ROOT] [--no-compiler] [--backend aot_eager|inductor]
                              [--device cpu|cuda] [--activations relu,gelu]

scripts/check_wheel.sh runs it on the wheel installed into a fresh virtual
environment (--no-compiler: with no C/C++/CUDA compiler on PATH), tests/test_packaging.py
on the build of the source tree, scripts/gpu_run.sh on the CUDA wheel. Checks: where
mlp_ext comes from (not ROOT; the stable-ABI library), float64 gradcheck of o and s
for every activation, FusedMLP against the nn.Sequential it replaces (outputs and
gradients), torch.compile(fullgraph=True) of a training step against eager.
"""
import argparse
import os
import shutil
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source-root", help="the source tree mlp_ext must not be imported from")
    parser.add_argument("--no-compiler", action="store_true",
                        help="fail unless no C/C++/CUDA compiler is on PATH")
    parser.add_argument("--backend", default="aot_eager",
                        help="torch.compile backend (inductor needs a C++ compiler on CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--activations", help="comma-separated; default: all")
    args = parser.parse_args()

    if args.no_compiler:
        found = {c: shutil.which(c) for c in ("cc", "c++", "gcc", "g++", "clang", "clang++", "nvcc")}
        found = {c: p for c, p in found.items() if p}
        assert not found, f"compilers on PATH ({os.environ.get('PATH')}): {found}"

    import torch
    import mlp_ext

    here = os.path.dirname(os.path.abspath(mlp_ext.__file__))
    library = os.path.abspath(mlp_ext._C.__file__)
    print(f"smoke: mlp_ext {mlp_ext.__version__} from {here}; torch {torch.__version__}; "
          f"library {os.path.basename(library)}")
    if args.source_root:
        root = os.path.realpath(args.source_root)
        assert not os.path.realpath(here).startswith(root + os.sep), \
            f"mlp_ext was imported from the source tree {root}, not from the installation: {here}"
    info = mlp_ext.build_info
    assert mlp_ext.__version__ == info["version"], (mlp_ext.__version__, info)
    assert info["torch_version"].split("+")[0].split(".")[:2] == \
        torch.__version__.split("+")[0].split(".")[:2], (info, torch.__version__)
    assert ".abi3." in os.path.basename(library), f"not a stable-ABI library: {library}"

    device = torch.device(args.device)
    activations = args.activations.split(",") if args.activations else list(mlp_ext.ACTIVATIONS)
    unknown = set(activations) - set(mlp_ext.ACTIVATIONS)
    assert not unknown, f"unknown activations {unknown}; mlp_ext has {mlp_ext.ACTIVATIONS}"
    checks = 0

    # gradcheck: o and s, float64, biases and weight decay, every input requiring grad.
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()

    for activation in activations:
        inputs = (leaf(4, 3), leaf(5, 3), leaf(2, 5), leaf(5), leaf(2))
        fn = lambda *t: mlp_ext.fused_mlp(*t, activation=activation, weight_decay=0.3)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs), f"gradcheck failed for {activation}"
        checks += 1
    print(f"smoke: gradcheck passed for {', '.join(activations)}")

    # The module against the nn.Sequential it replaces: same weights, same outputs and gradients.
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.GELU(), torch.nn.Linear(10, 4)).to(device)
    fused = mlp_ext.FusedMLP.from_sequential(seq, copy_weights=True)
    x = torch.randn(3, 5, 6, device=device)
    o_seq, o_fused = seq(x), fused(x)
    torch.testing.assert_close(o_fused, o_seq)
    o_seq.square().sum().backward()
    o_fused.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), seq.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}.grad: {m}")
    checks += 1
    print("smoke: FusedMLP equals nn.Sequential (outputs and gradients)")

    # torch.compile(fullgraph=True) of a training step, against eager.
    torch._dynamo.reset()
    mlp = mlp_ext.FusedMLP(6, 10, 4, activation=activations[0], weight_decay=0.01, device=device)

    def step(x, y):
        o, s = mlp(x, return_penalty=True)
        return torch.nn.functional.cross_entropy(o, y) + s

    x, y = torch.randn(9, 6, device=device), torch.randint(0, 4, (9,), device=device)
    compiled = torch.compile(step, fullgraph=True, backend=args.backend)
    loss = compiled(x, y)
    grads = torch.autograd.grad(loss, list(mlp.parameters()))
    loss_eager = step(x, y)
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(grads, torch.autograd.grad(loss_eager, list(mlp.parameters()))):
        torch.testing.assert_close(a, b)
    checks += 1
    print(f"smoke: torch.compile(fullgraph=True, backend={args.backend!r}) equals eager")
    print(f"smoke: all {checks} checks passed on {device}")


if __name__ == "__main__":
    sys.exit(main())
