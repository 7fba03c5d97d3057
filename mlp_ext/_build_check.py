"""The torch-version guard: mlp_ext._C is compiled against one torch, whose C++
symbols change from one minor release to the next, so loading it under another
torch fails with "undefined symbol: _ZN3c10...". The build records the torch it
compiled against in mlp_ext/_build_info.py (written by setup.py's build_ext,
beside the library); `import mlp_ext` calls check() before it loads _C and raises
an ImportError that names both torches and the command that fixes it.

This file imports nothing of the package and torch only inside check(), so that
setup.py can load it by path for the wheel's version label (one definition).

What counts as a mismatch, and why:
- torch's major.minor. Each minor release changes c10/ATen's C++ API (mangled
  names, class layouts); patch releases are fixes on a release branch that keep
  them, so a build for 2.13.0 loads under 2.13.1 and is allowed to.
- the flavour: CPU, or the CUDA (or ROCm) major.minor torch was built with. A CUDA
  build links libtorch_cuda and the CUDA runtime of its toolkit, which a CPU torch
  lacks and a torch for another CUDA may not provide in the same version; a CPU
  build under a CUDA torch would load but have no CUDA kernels, which would surface
  later as a confusing "no kernel for CUDA" error instead of here.
- the C++11 string ABI (_GLIBCXX_USE_CXX11_ABI) libtorch was compiled with: it
  changes the mangled name of every function that takes a std::string.
"""
import os
import sys

RECORD = "_build_info.py"  # beside this file, written at build time, never committed


def flavour(cuda=None, hip=None) -> str:
    """"cpu", "cu130" (CUDA 13.0), "rocm6.4" (ROCm 6.4): the local-label spelling of
    torch's own wheels."""
    if cuda:
        return "cu" + "".join(cuda.split(".")[:2])
    if hip:
        return "rocm" + ".".join(hip.split(".")[:2])
    return "cpu"


def major_minor(version: str) -> str:
    """"2.13" from "2.13.0+cpu", "2.13.0a0+git1234", "2.13.0.dev20260101"."""
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2])


def local_label(torch_version: str, cuda=None, hip=None) -> str:
    """The wheel's local version label, e.g. "torch2.13cpu" or "torch2.11cu130"."""
    return f"torch{major_minor(torch_version)}{flavour(cuda, hip)}"


def describe(version: str, cuda=None, hip=None) -> str:
    kind = f"CUDA {cuda}" if cuda else f"ROCm {hip}" if hip else "CPU"
    return f"torch {version} ({kind})"


def mismatch(recorded: dict, running: dict):
    """Why a build recorded as `recorded` must not be loaded under `running` (both
    dicts with torch_version, cuda, hip, cxx11_abi), or None when it may be."""
    reasons = []
    if major_minor(recorded["torch_version"]) != major_minor(running["torch_version"]):
        reasons.append(f"torch {major_minor(recorded['torch_version'])} vs "
                       f"{major_minor(running['torch_version'])}")
    built_for = flavour(recorded.get("cuda"), recorded.get("hip"))
    running_flavour = flavour(running.get("cuda"), running.get("hip"))
    if built_for != running_flavour:
        reasons.append(f"{built_for} vs {running_flavour}")
    abi = (recorded.get("cxx11_abi"), running.get("cxx11_abi"))
    if None not in abi and abi[0] != abi[1]:
        reasons.append(f"_GLIBCXX_USE_CXX11_ABI={int(abi[0])} vs {int(abi[1])}")
    return "; ".join(reasons) or None


def _source_root(package_dir: str):
    """The checkout the package is in (an in-place or editable build), or None for an
    installed wheel."""
    root = os.path.dirname(package_dir)
    return root if os.path.isfile(os.path.join(root, "setup.py")) and \
        os.path.isdir(os.path.join(root, "csrc")) else None


def fix_command(package_dir: str, running=None) -> str:
    """What to run to get a build for the running torch."""
    pip = f"{sys.executable} -m pip install"
    root = _source_root(package_dir)
    if root is not None:
        return f"cd {root} && {pip} --no-build-isolation -e ."
    from ._version import __version__

    if running:
        label = local_label(running["torch_version"], running.get("cuda"), running.get("hip"))
        wheel = f"mlp_ext-{__version__}+{label}-*.whl"
    else:
        wheel = "<the mlp_ext wheel built for your torch>"
    return (f"{pip} --force-reinstall --no-deps {wheel} (the wheel built for this torch; README: "
            f"Install), or build the source distribution against this torch: "
            f"{pip} --no-build-isolation --force-reinstall --no-deps mlp_ext-{__version__}.tar.gz")


def running_torch() -> dict:
    import torch

    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    return {"torch_version": str(torch.__version__), "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
            "cxx11_abi": None if abi is None else bool(abi)}


def check(package_dir: str) -> dict:
    """Raises ImportError unless the build in package_dir was made for the running
    torch; returns the recorded build information."""
    path = os.path.join(package_dir, RECORD)
    if not os.path.isfile(path):
        raise ImportError(
            f"mlp_ext is not built: {path} is missing (the build writes it beside the "
            f"compiled operator mlp_ext/_C*.so). Build it against your torch: "
            f"{fix_command(package_dir, running_torch())}")
    recorded = {}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), {}, recorded)  # a few assignments of literals
    running = running_torch()
    why = mismatch(recorded, running)
    if why is not None:
        raise ImportError(
            f"mlp_ext {recorded.get('version', '?')} was built for "
            f"{describe(recorded['torch_version'], recorded.get('cuda'), recorded.get('hip'))}, "
            f"but {describe(running['torch_version'], running['cuda'], running['hip'])} is "
            f"installed ({why}); its compiled operator works only with the torch release and "
            f"flavour it was built for (elsewhere: undefined symbols, or no CUDA kernels). "
            f"Fix: {fix_command(package_dir, running)}")
    return recorded
