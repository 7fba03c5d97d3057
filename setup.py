"""Build of mlp_ext: the C++ CPU operator always, the CUDA operator where a CUDA
toolkit and a CUDA build of torch are present.

MLP_EXT_CUDA=1 forces the CUDA build (and fails clearly without a toolkit),
MLP_EXT_CUDA=0 skips it; MLP_EXT_DEBUG=1 builds with debug information (-g).
Build with `pip install --no-build-isolation .` so the extension compiles against
the torch already installed; `bash scripts/build_wheel.sh` builds a wheel and an sdist.

What every build records and how it is named:
- the library is built for CPython's limited API (mlp_ext/_C.abi3.so; the module
  only registers ops with torch's dispatcher and uses no other Python C API), so
  one wheel serves every CPython from torch's minimum on;
- build_ext writes mlp_ext/_build_info.py beside the library: the torch (and CUDA)
  it compiled against, which `import mlp_ext` checks before loading the library
  (mlp_ext/_build_check.py);
- the version is mlp_ext/_version.py's plus the torch as a local label,
  0.2.0+torch2.13cpu: every build (wheel, editable or source install) works with
  one torch only, and says which, as torch's own wheels do (2.13.0+cpu). The sdist
  alone has the plain version: it builds against whatever torch it meets.
"""
import glob
import importlib.util
import os
import re
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a build without torch cannot work
    sys.exit("mlp_ext builds against an installed torch: install torch first, then run "
             "`pip install --no-build-isolation .`")

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, relpath):
    # By path: importing the package would load the library it is about to build.
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VERSION = _load("_mlp_ext_version", os.path.join("mlp_ext", "_version.py")).__version__
_check = _load("_mlp_ext_build_check", os.path.join("mlp_ext", "_build_check.py"))
TORCH_HIP = getattr(torch.version, "hip", None)
LOCAL_LABEL = _check.local_label(torch.__version__, torch.version.cuda, TORCH_HIP)
FULL_VERSION = VERSION if "sdist" in sys.argv[1:] else f"{VERSION}+{LOCAL_LABEL}"


def limited_api():
    """(wheel tag, -D flag or None): the CPython version the limited API targets.
    torch's BuildExtension defines Py_LIMITED_API=min_supported_cpython itself for a
    py_limited_api extension (0x030A0000, 3.10, in torch 2.13); the wheel's tag must
    say the same version. A torch without that attribute defines nothing: then we do."""
    hexversion = getattr(cpp_extension, "min_supported_cpython", None)
    define = None
    if hexversion is None:
        hexversion = "0x03090000"
        define = f"-DPy_LIMITED_API={hexversion}"
    value = int(hexversion, 16)
    return f"cp{value >> 24}{(value >> 16) & 0xFF}", define


PY_LIMITED_API, PY_LIMITED_API_DEFINE = limited_api()


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


def prefix_maps():
    """-ffile-prefix-map flags: __FILE__ (in every TORCH_CHECK message) and the debug
    information name our sources relative to the tree (csrc/mlp.cpp) and torch's
    headers as torch/include/..., so that a wheel holds no path of the machine that
    built it. The last matching map wins: torch's, whose install may lie in the tree."""
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    return [f"-ffile-prefix-map={HERE}{os.sep}=", f"-ffile-prefix-map={torch_dir}{os.sep}=torch{os.sep}"]


CUDA_KERNELS = build_cuda()


def extension():
    # csrc/: the device-independent operator; csrc/cpu/: the CPU kernels (always);
    # csrc/cuda/: the CUDA kernels (CUDA builds).
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp turns on at::parallel_for in our kernels; the library resolves to
    # the libgomp that torch has already loaded.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    maps = prefix_maps()
    defines = [PY_LIMITED_API_DEFINE] if PY_LIMITED_API_DEFINE else []
    # -g0 overrides the -g of Python's CFLAGS: debug information made the library 22 MB
    # instead of 1 MB (a 7 MB wheel instead of 0.4 MB) and the compile slower, and it
    # holds the paths of the machine that built it. MLP_EXT_DEBUG=1 keeps it.
    debug = [] if os.environ.get("MLP_EXT_DEBUG") == "1" else ["-g0"]
    cxx = ["-O3", *debug, *openmp, *maps, *defines]
    kwargs = dict(
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=openmp,
        # Only PyInit__C (csrc/ops.cpp) touches Python, through the limited API; the ops
        # reach Python through torch's dispatcher, so libtorch_python is not linked.
        py_limited_api=True,
    )
    if CUDA_KERNELS:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        nvcc = ["-O3", *[f"-Xcompiler={m}" for m in maps], *defines]
        return CUDAExtension("mlp_ext._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension("mlp_ext._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


BUILD_RECORD = "_build_info.py"


def build_record() -> str:
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    fields = dict(version=FULL_VERSION, local_label=LOCAL_LABEL, torch_version=str(torch.__version__),
                  cuda=torch.version.cuda, hip=TORCH_HIP,
                  cxx11_abi=None if abi is None else bool(abi), cuda_kernels=CUDA_KERNELS,
                  python_limited_api=PY_LIMITED_API)
    return ("# Written by setup.py's build_ext: what this build of mlp_ext._C was compiled\n"
            "# against, checked by mlp_ext/_build_check.py before the library is loaded.\n"
            + "".join(f"{k} = {v!r}\n" for k, v in fields.items()))


class build_ext(BuildExtension):
    """BuildExtension, then the build record beside each library it wrote (the build
    directory, which the wheel is made from, and with --inplace / editable installs the
    package in the tree), and in the tree the removal of libraries of another name: a
    _C.cpython-311-*.so of an older build would be imported before _C.abi3.so."""

    def run(self):
        super().run()
        inplace, self.inplace = self.inplace, False
        try:
            outputs = [self.get_ext_fullpath(ext.name) for ext in self.extensions]
        finally:
            self.inplace = inplace
        if inplace:
            outputs += [self.get_ext_fullpath(ext.name) for ext in self.extensions]
        for output in outputs:
            directory = os.path.dirname(output)
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, BUILD_RECORD), "w") as f:
                f.write(build_record())
        if inplace:
            for output in outputs[len(self.extensions):]:
                stem = os.path.basename(output).split(".")[0]
                for other in glob.glob(os.path.join(os.path.dirname(output), stem + ".*")):
                    if other != output and re.search(r"\.(so|pyd|dylib)$", other):
                        os.remove(other)


class build_py_without_record(build_py):
    """The package's Python files less a build record left in the tree by an earlier
    build: only build_ext writes the one a build ships (nor does the sdist carry one)."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir)
                if os.path.basename(m[2]) != BUILD_RECORD]


setup(
    name="mlp_ext",
    version=FULL_VERSION,
    description="A fused one-hidden-layer MLP with weight decay as one PyTorch custom operator (C++/CUDA)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mlp_ext", "mlp_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": build_ext, "build_py": build_py_without_record},
    # The wheel's tag: cp310-abi3 (for torch 2.13), installable on every later CPython.
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API}},
    python_requires=">=3.9",
    # torch is deliberately not listed: the build uses the torch already installed
    # (--no-build-isolation), a requirement here could let pip replace the user's
    # torch with a different multi-GB build, and a wheel built for one torch is
    # checked against the running one at import (mlp_ext/_build_check.py).
    install_requires=[],
    extras_require={"test": ["pytest", "numpy", "graphviz"], "bench": ["matplotlib", "tqdm"]},
)
