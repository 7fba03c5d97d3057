"""The AddressSanitizer + UndefinedBehaviorSanitizer build of the CPU operator
for scripts/sanitize.sh, in its own directory: never the mlp_ext/_C*.so of the
source tree.

    python scripts/sanitize_build.py OUT   # OUT/lib: an importable mlp_ext package

setup.py itself builds it (same sources, include paths and flags as the normal
build, from its extension()), run with MLP_EXT_CUDA=0 and with setuptools.setup
wrapped so that the sanitizer flags are appended to the extension's compile and
link arguments (later flags win: -O1 replaces setup.py's -O3). The Python files
of the package are copied beside the library by setup.py's build_py, on every
run, so PYTHONPATH=OUT/lib imports this build with the current Python code.

Idempotent: the library is rebuilt only when the fingerprint of its inputs
(every file under csrc/ but csrc/cuda/, setup.py, this file, the flags, the
compiler, torch and Python) differs from the one saved beside it; a rebuild
leaves ninja to recompile only what changed (it tracks headers and commands).
"""
import glob
import hashlib
import os
import runpy
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SANITIZERS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
              "-fno-omit-frame-pointer"]
# -g1: line tables for the reports, small objects. -fno-wrapv: Python's CFLAGS
# (which setuptools passes first) hold -fwrapv, which defines signed overflow
# and so turns off UBSan's check of it.
COMPILE = [*SANITIZERS, "-O1", "-g1", "-fno-wrapv"]
LINK = SANITIZERS


def fingerprint():
    h = hashlib.sha256()
    files = [f for f in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)
             if os.path.isfile(f) and os.sep + "cuda" + os.sep not in os.path.relpath(f, ROOT)]
    for f in sorted(files) + [os.path.join(ROOT, "setup.py"), os.path.abspath(__file__)]:
        h.update(os.path.relpath(f, ROOT).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    import torch
    cxx = os.environ.get("CXX", "c++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    for part in (COMPILE, LINK, cxx, version, torch.__version__, torch.__file__, sys.version):
        h.update(repr(part).encode() + b"\0")
    return h.hexdigest()


def main():
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "asan"))
    lib, temp, stamp = (os.path.join(out, p) for p in ("lib", "temp", "fingerprint"))
    os.environ["MLP_EXT_CUDA"] = "0"
    key = fingerprint()
    built = glob.glob(os.path.join(lib, "mlp_ext", "_C*.so"))
    fresh = built and os.path.exists(stamp) and open(stamp).read().strip() == key

    # The package's Python files: removed, then copied anew by build_py; all but the
    # build record (_build_info.py), which build_ext writes beside the library it
    # builds and which stays true for a reused library (torch is in the fingerprint).
    pkg = os.path.join(lib, "mlp_ext")
    for f in glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True):
        if not (fresh and os.path.basename(f) == "_build_info.py"):
            os.remove(f)
    argv = ["build_py", "--build-lib", lib, "--force"]
    if fresh:
        print(f"sanitize_build: reusing {built[0]} (sources unchanged)", flush=True)
    else:
        print(f"sanitize_build: building the ASan/UBSan operator into {lib}", flush=True)
        if os.path.exists(stamp):
            os.remove(stamp)
        for f in built:
            os.remove(f)
        argv += ["build_ext", "--build-lib", lib, "--build-temp", temp, "--force"]

    import setuptools

    real_setup = setuptools.setup

    def setup(**kwargs):
        for ext in kwargs.get("ext_modules", []):
            args = ext.extra_compile_args
            if isinstance(args, dict):
                args["cxx"] = [*args.get("cxx", []), *COMPILE]
            else:
                ext.extra_compile_args = [*args, *COMPILE]
            ext.extra_link_args = [*ext.extra_link_args, *LINK]
        return real_setup(**kwargs)

    setuptools.setup = setup  # setup.py does `from setuptools import setup` when it runs
    cwd, sys_argv = os.getcwd(), sys.argv
    os.chdir(ROOT)  # setup.py globs its sources relative to the working directory
    sys.argv = [os.path.join(ROOT, "setup.py"), "-q", *argv]
    try:
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    finally:
        os.chdir(cwd)
        sys.argv = sys_argv
        setuptools.setup = real_setup
    if not fresh:
        built = glob.glob(os.path.join(lib, "mlp_ext", "_C*.so"))
        if len(built) != 1:
            sys.exit(f"sanitize_build: expected one mlp_ext/_C*.so in {lib}, found {built}")
        with open(stamp, "w") as fh:
            fh.write(key + "\n")


if __name__ == "__main__":
    main()
