"""Checks a built wheel and sdist of mlp_ext (scripts/check_wheel.sh):

    python scripts/inspect_dist.py DIST_DIR [--source ROOT] [--forbid TEXT ...] [--wheel-only]

The wheel: named mlp_ext-<version>+torch<X.Y><cpu|cuXYZ>-cp3XX-abi3-<platform>.whl;
holds the package (its Python files, the build record, one mlp_ext/_C.abi3.so) and
nothing else: no tests, no C++ sources, no caches; its metadata has the wheel's
version and no requirement on torch; no file in it contains any --forbid text (the
paths of the machine that built it). The sdist: mlp_ext-<version>.tar.gz, the plain
version, holds every file of csrc/ (with --source: all those git tracks there),
setup.py, pyproject.toml and the package's Python files, and no library or build
record. Exits 1 with every problem listed, else prints what it checked.
"""
import argparse
import email.parser
import glob
import os
import re
import subprocess
import sys
import tarfile
import zipfile

WHEEL_NAME = re.compile(
    r"^mlp_ext-(?P<version>(?P<public>\d+\.\d+\.\d+)\+(?P<label>torch\d+\.\d+(cpu|cu\d+|rocm[\d.]+)))"
    r"-(?P<python>cp3\d+)-abi3-(?P<platform>[\w.]+)\.whl$")
SDIST_NAME = re.compile(r"^mlp_ext-(?P<version>\d+\.\d+\.\d+)\.tar\.gz$")
PACKAGE_FILES = ("__init__.py", "_version.py", "_build_check.py", "_build_info.py",
                 "functional.py", "modules.py", "_meta.py", "reference.py")


def check_wheel(path, forbid, problems):
    name = os.path.basename(path)
    m = WHEEL_NAME.match(name)
    if not m:
        problems.append(f"{name}: expected a name like mlp_ext-0.2.0+torch2.13cpu-cp310-abi3-"
                        f"linux_x86_64.whl (local torch label, abi3 tag)")
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        libraries = [n for n in names if re.fullmatch(r"mlp_ext/_C\.abi3\.(so|pyd)", n)]
        if len(libraries) != 1:
            problems.append(f"{name}: expected one mlp_ext/_C.abi3.so, found "
                            f"{[n for n in names if '/_C' in n]}")
        for f in PACKAGE_FILES:
            if f"mlp_ext/{f}" not in names:
                problems.append(f"{name}: mlp_ext/{f} is missing")
        dist_info = f"mlp_ext-{m['version']}.dist-info/"
        for n in names:
            top = n.split("/")[0]
            if top not in ("mlp_ext", dist_info.rstrip("/")):
                problems.append(f"{name}: {n} is outside the package and its dist-info")
            if re.search(r"(^|/)(tests?|csrc)/|(^|/)test_[^/]*\.py$|conftest\.py$|\.(cpp|cu|cuh|h|o)$"
                         r"|__pycache__|\.py[co]$", n):
                problems.append(f"{name}: {n} does not belong in the wheel (tests, sources, caches)")
        for n in names:
            data = z.read(n)
            for text in forbid:
                at = data.find(text.encode())
                if at >= 0:
                    context = data[max(0, at - 40):at + len(text) + 40].decode("utf-8", "replace")
                    problems.append(f"{name}: {n} contains the build path {text!r}: ...{context!r}...")
        metadata = email.parser.Parser().parsestr(z.read(dist_info + "METADATA").decode())
        if metadata["Version"] != m["version"]:
            problems.append(f"{name}: METADATA says version {metadata['Version']}, the name {m['version']}")
        requires = metadata.get_all("Requires-Dist") or []
        if any(re.match(r"torch\b", r) for r in requires):
            problems.append(f"{name}: METADATA requires torch ({requires}): pip could replace the "
                            f"user's torch")
        record = {}
        if "mlp_ext/_build_info.py" in names:
            exec(z.read("mlp_ext/_build_info.py").decode(), {}, record)
            if record.get("version") != m["version"] or record.get("local_label") != m["label"]:
                problems.append(f"{name}: the build record says version {record.get('version')}, "
                                f"label {record.get('local_label')}; the name {m['version']}, {m['label']}")
            if record.get("python_limited_api") != m["python"]:
                problems.append(f"{name}: tagged {m['python']}-abi3, built for the limited API of "
                                f"{record.get('python_limited_api')}")
        if "mlp_ext/_version.py" in names:
            scope = {}
            exec(z.read("mlp_ext/_version.py").decode(), scope)
            if scope["__version__"] != m["public"]:
                problems.append(f"{name}: mlp_ext/_version.py has {scope['__version__']}, the name "
                                f"{m['public']}")
    print(f"inspect_dist: {name}: {len(names)} files, {os.path.getsize(path) / 2**20:.1f} MiB, "
          f"torch {record.get('torch_version')} (CUDA kernels: {record.get('cuda_kernels')})")
    return m["public"]


def check_sdist(path, source, problems):
    name = os.path.basename(path)
    m = SDIST_NAME.match(name)
    if not m:
        problems.append(f"{name}: expected mlp_ext-<version>.tar.gz with the plain version")
        return None
    prefix = name[:-len(".tar.gz")] + "/"
    with tarfile.open(path) as t:
        names = {n[len(prefix):] for n in t.getnames() if n.startswith(prefix)}
    needed = {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in",
              *(f"mlp_ext/{f}" for f in PACKAGE_FILES if f != "_build_info.py")}
    if source:
        tracked = subprocess.run(["git", "-C", source, "ls-files", "csrc"], capture_output=True,
                                 text=True, check=True).stdout.split()
        needed |= set(tracked)
    needed |= {"csrc/ops.h", "csrc/mlp.h"}  # headers, which no setup.py source list names
    for n in sorted(needed - names):
        problems.append(f"{name}: {n} is missing (the sdist must build from source)")
    for n in sorted(names):
        if n.endswith((".so", ".pyd")) or n.endswith("_build_info.py"):
            problems.append(f"{name}: {n} is a build output")
    print(f"inspect_dist: {name}: {len(names)} files, csrc/ complete")
    return m["version"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist")
    parser.add_argument("--source", help="the source tree (git) the sdist must cover")
    parser.add_argument("--forbid", action="append", default=[], help="text no wheel file may hold")
    parser.add_argument("--wheel-only", action="store_true", help="no sdist to check (gpu_run.sh)")
    args = parser.parse_args()
    problems = []
    wheels = glob.glob(os.path.join(args.dist, "mlp_ext-*.whl"))
    sdists = [] if args.wheel_only else glob.glob(os.path.join(args.dist, "mlp_ext-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != (0 if args.wheel_only else 1):
        sys.exit(f"inspect_dist: expected one wheel{'' if args.wheel_only else ' and one sdist'} "
                 f"in {args.dist}, found {wheels} and {sdists}")
    versions = {check_wheel(wheels[0], [f for f in args.forbid if f], problems),
                *(check_sdist(s, args.source, problems) for s in sdists)}
    if None not in versions and len(versions) != 1:
        problems.append(f"the wheel and the sdist have different versions: {sorted(versions)}")
    for p in problems:
        print(f"inspect_dist: FAILED: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print("inspect_dist: passed")


if __name__ == "__main__":
    main()
