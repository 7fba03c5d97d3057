"""A small forward + backward of every CUDA kernel path, for compute-sanitizer.

    compute-sanitizer --tool memcheck python scripts/cuda_sanitize_case.py

Covers: the vector and the scalar path (odd width, misaligned bias), db1 in one
pass and over several row chunks, the one- and two-block penalty, an empty
batch, in float32, float64, float16 and bfloat16. Checks the results against
the float64 reference too, so a run that the sanitizer passes is also right.
Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (gpu_run.sh does) so that every
tensor is its own allocation and an access past its end is caught.
"""
import torch

import mlp_ext
from mlp_ext import reference

# (n, d, h, q): one db1 pass + one-block penalty; several row chunks, vectors
# and a two-block penalty; odd widths (scalar path); an empty batch.
SHAPES = [(5, 4, 6, 3), (300, 80, 64, 8), (77, 9, 35, 5), (0, 4, 6, 3)]
CASES = [("relu", torch.float32), ("gelu", torch.bfloat16), ("silu", torch.float16),
         ("tanh", torch.float64)]


def main():
    torch.manual_seed(0)
    for activation, dtype in CASES:
        for n, d, h, q in SHAPES:
            for misaligned_bias in (False, True):
                def param(*shape):
                    return torch.randn(*shape, device="cuda").to(dtype).requires_grad_()

                x, w1, w2, b2 = param(n, d), param(h, d), param(q, h), param(q)
                b1 = param(h + 1)[1:] if misaligned_bias else param(h)
                o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=activation,
                                         weight_decay=0.1)
                grads = torch.autograd.grad((o, s), (x, w1, w2, b1, b2),
                                            (torch.ones_like(o), torch.ones_like(s)))
                exact = [t.detach().double().requires_grad_() for t in (x, w1, w2, b1, b2)]
                o64, s64 = reference.fused_mlp(*exact, activation=activation, weight_decay=0.1)
                grads64 = torch.autograd.grad((o64, s64), exact,
                                              (torch.ones_like(o64), torch.ones_like(s64)))
                tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 5e-2)
                for got, want in zip((o, s, *grads), (o64, s64, *grads64)):
                    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
                    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)
    torch.cuda.synchronize()
    print("cuda_sanitize_case: all cases ran and match the float64 reference")


if __name__ == "__main__":
    main()
