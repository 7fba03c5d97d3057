"""Compile check of the CUDA operator on a machine without a GPU (run by check_cuda.sh).

Every csrc/cuda/*.cu is compiled to an object with nvcc for sm_90, and every
csrc/cuda/*.cpp with the host compiler, each with the flags torch's
CUDAExtension gives it (torch.utils.cpp_extension's COMMON_NVCC_FLAGS, arch
flags and include paths, setup.py's extra flags), once as C++17 (what older
torch releases pass) and once as C++20 (what torch 2.13 passes). Then every
mlp_ext::gpu and mlp_ext::narrow_mlp_* symbol that the .cpp objects use must be
defined by the .cu objects, or importing the real build would fail on the GPU
machine.

Then the kernels run: the .cu files are compiled as C++ against a CPU stand-in
for the CUDA execution model (scripts/cuda_emulation/emu.h: blocks in turn, the
threads of a block as real threads meeting at __syncthreads), with
AddressSanitizer and UndefinedBehaviorSanitizer, and
scripts/cuda_emulation/kernel_test.cpp checks every launcher's results against
plain loops (every dtype and path, bitwise where the order is the same).

A CPU build of torch ships the c10/cuda headers without the header that its CMake
generates for them (c10/cuda/impl/cuda_cmake_macros.h); the check writes it, as
that CMake would, into a temporary include directory.

With --racecheck the kernels also run under ThreadSanitizer (a missing
__syncthreads shows as a data race between the threads of a block).

Exit status 0 only when everything compiles and every check passes; compiler
output is shown as is.
"""
import glob
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH_LIST = "9.0"  # H100 / H200
STANDARDS = ("c++17", "c++20")
os.environ["TORCH_CUDA_ARCH_LIST"] = ARCH_LIST
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402  (reads TORCH_CUDA_ARCH_LIST)

# Keep in sync with extension() in setup.py (prefix_maps(): sources and torch's
# headers named relative, so that no build path lands in a wheel).
_PREFIX_MAPS = [f"-ffile-prefix-map={ROOT}{os.sep}=",
                f"-ffile-prefix-map={os.path.dirname(os.path.abspath(torch.__file__))}{os.sep}=torch{os.sep}"]
SETUP_INCLUDE_DIRS = [os.path.join(ROOT, "csrc")]
SETUP_CXX_FLAGS = ["-O3", "-g0", "-fopenmp", *_PREFIX_MAPS]
SETUP_NVCC_FLAGS = ["-O3", *[f"-Xcompiler={m}" for m in _PREFIX_MAPS]]
# What BuildExtension adds to every compile of mlp_ext._C (a py_limited_api extension:
# Py_LIMITED_API at torch's minimum CPython).
EXTENSION_DEFINES = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                     f"-DPy_LIMITED_API={getattr(cpp_extension, 'min_supported_cpython', '0x03090000')}"]

# What the .cu objects define for the .cpp objects: mlp_ext::gpu::* (mlp_kernels.cuh)
# and mlp_ext::narrow_mlp_* (narrow_mlp.cuh), as mangled names.
DEVICE_SYMBOL = re.compile(r"7mlp_ext(3gpu|\d+narrow_mlp_)")

# A diagnostic located in one of our sources: "file:line:col: warning" (gcc) or
# "file(line): warning" (nvcc); the path absolute or, should a compiler apply the
# prefix map to it, relative (but never torch's torch/csrc/).
OWN_DIAGNOSTIC = re.compile(
    r"(?:^|\s)(?:" + re.escape(ROOT + os.sep) + r")?csrc/\S*(:\d+:\d+:|\(\d+\):) (warning|error)",
    re.MULTILINE)


def fail(message):
    print(f"check_cuda: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def find_cuda_home():
    """The toolkit root: $CUDA_HOME / $CUDA_PATH, else where nvcc lives, else /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.access(
            os.path.join(home, "bin", "nvcc"), os.X_OK
        ):
            return home
    fail("no CUDA toolkit found (set CUDA_HOME to the directory with bin/nvcc and include/)")


def nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+), V(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        fail(f"cannot read the version of {nvcc}:\n{out}")
    return tuple(int(g) for g in match.groups())


def cmake_macros_shim(torch_include, cuda_version, tmp):
    """Include dir providing c10/cuda/impl/cuda_cmake_macros.h if this torch lacks it
    (the contents of c10/cuda/impl/cuda_cmake_macros.h.in as torch's CMake fills it in)."""
    name = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if os.path.isfile(os.path.join(torch_include, name)):
        return []
    major, minor, _, _, patch = cuda_version
    path = os.path.join(tmp, "shim", name)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(
            "#pragma once\n"
            "// Written by scripts/check_cuda.py: what torch's CMake generates from\n"
            "// c10/cuda/impl/cuda_cmake_macros.h.in for a shared-library build.\n"
            "#define C10_CUDA_BUILD_SHARED_LIBS\n"
            f"#define TORCH_CUDA_VERSION_MAJOR {major}\n"
            f"#define TORCH_CUDA_VERSION_MINOR {minor}\n"
            f"#define TORCH_CUDA_VERSION_PATCH {patch}\n"
            "#define TORCH_CUDA_VERSION_BUILD 0\n"
        )
    return [os.path.join(tmp, "shim")]


def torch_default_standard():
    """The -std= torch's BuildExtension adds when none is given (for the log)."""
    match = re.search(r"cpp_flag_prefix \+ '(c\+\+\d+)'", inspect.getsource(cpp_extension))
    return match.group(1) if match else "unknown"


def emulation_command(cu_files, cuda_home, cxx, tmp, sanitizers="address,undefined"):
    """A shell command that builds the .cu files with kernel_test.cpp on the CPU
    stand-in, with the given -fsanitize= list, and runs the result."""
    emulation = os.path.join(ROOT, "scripts", "cuda_emulation")
    launch = re.compile(r"(\b\w+(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\(", re.S)
    sources = []
    work = os.path.join(tmp, "emulation-" + sanitizers.replace(",", "-"))
    os.makedirs(work)
    for src in cu_files:
        with open(src) as f:
            # (newlines kept, so that diagnostics point at the right lines)
            text = launch.sub(lambda m: f"emu::launch({m.group(2)}, {m.group(1)})"
                              + "\n" * m.group(0).count("\n") + "(", f.read())
        sources.append(os.path.join(work, os.path.basename(src) + ".cpp"))
        with open(sources[-1], "w") as f:
            f.write(f'#line 1 "{src}"\n' + text)
    binary = os.path.join(work, "kernel_test")
    build = [cxx, "-std=c++20", "-O1", "-g", "-pthread", f"-fsanitize={sanitizers}",
             "-fno-sanitize-recover=all", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas",
             "-include", os.path.join(emulation, "emu.h"),
             f"-I{os.path.join(ROOT, 'csrc', 'cuda')}", f"-I{os.path.join(cuda_home, 'include')}",
             *[f for f in cpp_extension.COMMON_NVCC_FLAGS if f.startswith("-D")],
             *sources, os.path.join(emulation, "kernel_test.cpp"), "-o", binary]
    return ["bash", "-c", f"{shlex.join(build)} && {shlex.quote(binary)}"]


def main():
    cuda_home = find_cuda_home()
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    cxx = os.environ.get("CXX", "c++")
    version = nvcc_version(nvcc)
    torch_include = cpp_extension.include_paths("cpu")[0]

    # Every .cu of the project: the extension's and the standalone GPU tools'.
    cu_files = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
                      + glob.glob(os.path.join(ROOT, "tools", "*.cu")))
    # The CPU stand-in models threads, shared memory and __syncthreads, not the
    # tensor-core (wmma) and cp.async instructions of narrow_mlp.cu.
    emulated_files = [os.path.join(ROOT, "csrc", "cuda", "mlp_kernels.cu")]
    cpp_files = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if not cu_files:
        fail("no csrc/cuda/*.cu found")

    with tempfile.TemporaryDirectory(prefix="check_cuda_") as tmp:
        includes = (
            SETUP_INCLUDE_DIRS
            + cpp_extension.include_paths("cpu")  # torch's include dirs
            + [os.path.join(cuda_home, "include")]
            + cmake_macros_shim(torch_include, version, tmp)
            + [sysconfig.get_paths()["include"]]  # Python.h
        )
        include_flags = [f"-I{d}" for d in includes]
        # As torch.utils.cpp_extension's unix_cuda_flags composes them.
        nvcc_flags = (
            cpp_extension.COMMON_NVCC_FLAGS
            + ["--compiler-options", "-fPIC"]
            + SETUP_NVCC_FLAGS
            + cpp_extension._get_cuda_arch_flags(SETUP_NVCC_FLAGS)
            # Stricter than the build: our .cu files include no torch header.
            + ["--Werror", "all-warnings", "-Xcompiler", "-Wall"]
        )
        cxx_flags = SETUP_CXX_FLAGS + ["-fPIC"]

        for std in STANDARDS:
            os.makedirs(os.path.join(tmp, std))
        jobs = []  # (label, command)
        for std in STANDARDS:
            for src in cu_files:
                obj = os.path.join(tmp, std, os.path.basename(src) + ".o")
                jobs.append((f"{os.path.relpath(src, ROOT)} -std={std}",
                             [nvcc, *EXTENSION_DEFINES, *include_flags, *nvcc_flags,
                              f"-std={std}", "-c", src, "-o", obj]))
            for src in cpp_files:
                obj = os.path.join(tmp, std, os.path.basename(src) + ".o")
                jobs.append((f"{os.path.relpath(src, ROOT)} -std={std}",
                             [cxx, *EXTENSION_DEFINES, *include_flags, *cxx_flags,
                              f"-std={std}", "-c", src, "-o", obj]))
        jobs.append(("kernels on the CPU stand-in (scripts/cuda_emulation), memcheck",
                     emulation_command(emulated_files, cuda_home, cxx, tmp)))
        if "--racecheck" in sys.argv[1:]:
            # ThreadSanitizer on the threads of each block: a missing __syncthreads
            # between shared-memory writes and reads is a reported data race.
            # About 3 more minutes on 2 cores, so not part of the default check.
            jobs.append(("kernels on the CPU stand-in (scripts/cuda_emulation), racecheck",
                         emulation_command(emulated_files, cuda_home, cxx, tmp, "thread")))

        print(f"check_cuda: nvcc {'.'.join(map(str, version[:2]))} ({nvcc}), host compiler {cxx}, "
              f"TORCH_CUDA_ARCH_LIST={ARCH_LIST}, torch's default -std={torch_default_standard()}; "
              f"checking {len(cu_files)} .cu + {len(cpp_files)} .cpp as {' and '.join(STANDARDS)}",
              flush=True)

        def run(job):
            label, command = job
            return label, command, subprocess.run(command, capture_output=True, text=True)

        failed = 0
        with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            for label, command, result in pool.map(run, jobs):
                status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
                print(f"check_cuda: {label}: {status}", flush=True)
                if result.returncode != 0:
                    failed += 1
                    print("  " + shlex.join(command), file=sys.stderr)
                output = result.stdout + result.stderr
                # On success, show warnings only if they concern our own sources
                # (torch's headers warn under C++17, which is not ours to fix).
                if result.returncode != 0 or OWN_DIAGNOSTIC.search(output):
                    sys.stderr.write(output)
                elif "cuda_emulation" in label:
                    sys.stdout.write("  " + output)
        if failed:
            fail(f"{failed} of {len(jobs)} checks failed")

        # Every mlp_ext::gpu symbol a .cpp object needs is defined by a .cu object.
        for std in STANDARDS:
            def symbols(paths, which):
                out = subprocess.run(["nm", which, *paths], check=True, capture_output=True,
                                     text=True).stdout
                return {line.split()[-1] for line in out.splitlines()
                        if line.strip() and DEVICE_SYMBOL.search(line.split()[-1])}

            objects = lambda files: [os.path.join(tmp, std, os.path.basename(f) + ".o") for f in files]
            needed = symbols(objects(cpp_files), "--undefined-only") if cpp_files else set()
            defined = symbols(objects(cu_files), "--defined-only")
            missing = sorted(needed - defined)
            if missing:
                names = subprocess.run(["c++filt", *missing], capture_output=True, text=True).stdout
                fail(f"-std={std}: the .cpp objects use kernels that no .cu object defines:\n{names}")
            print(f"check_cuda: -std={std}: all {len(needed)} mlp_ext::gpu / narrow_mlp_ symbols used by the "
                  f".cpp objects are defined by the .cu objects")
    print("check_cuda: OK")


if __name__ == "__main__":
    main()
