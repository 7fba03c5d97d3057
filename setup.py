"""Build of mlp_ext: the C++ CPU operator always, the CUDA operator where a CUDA
toolkit and a CUDA build of torch are present.

MLP_EXT_CUDA=1 forces the CUDA build (and fails clearly without a toolkit),
MLP_EXT_CUDA=0 skips it. Build with `pip install --no-build-isolation .` so the
extension compiles against the torch already installed.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a build without torch cannot work
    sys.exit("mlp_ext builds against an installed torch: install torch first, then run "
             "`pip install --no-build-isolation .`")


def build_cuda() -> bool:
    forced = os.environ.get("MLP_EXT_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            sys.exit(f"MLP_EXT_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or CUDA_HOME is None):
            sys.exit("MLP_EXT_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                     f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    here = os.path.dirname(os.path.abspath(__file__))
    # csrc/: the device-independent operator; csrc/cpu/: the CPU kernels (always);
    # csrc/cuda/: the CUDA kernels (CUDA builds).
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp turns on at::parallel_for in our kernels; the library resolves to
    # the libgomp that torch has already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-O3", *openmp]
    kwargs = dict(
        include_dirs=[os.path.join(here, "csrc")],
        extra_link_args=openmp,
        py_limited_api=False,
    )
    if build_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        return CUDAExtension(
            "mlp_ext._C", sources, extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, **kwargs)
    return CppExtension("mlp_ext._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    name="mlp_ext",
    version="0.1.0",
    description="A fused one-hidden-layer MLP with weight decay as one PyTorch custom operator (C++/CUDA)",
    packages=find_packages(include=["mlp_ext", "mlp_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    # torch is deliberately not listed: the build uses the torch already
    # installed (--no-build-isolation), and a requirement here could pull a
    # different multi-GB build over the user's own.
    install_requires=[],
    extras_require={"test": ["pytest", "numpy", "graphviz"], "bench": ["matplotlib", "tqdm"]},
)
