"""What a bare GPU machine lacks to run `make gpu-check` whole, in one archive that travels with the tree.

    make gpu-bundle                            # here (PyPI reachable): writes .gpu-bundle/site.tar.xz
    python -m benchmarks.gpu_bundle --check    # there: unpacks it and imports every package it carries

The lent machine (reference: /work/.library/device/KINDS.md) has Python 3.12, torch, numpy, safetensors, rich,
sentencepiece and pytest, no network, and none of msgspec, ftfy, litestar, aiortc, PyAV or PyNvVideoCodec: without
them most of gpu-check's parts fail at their first import, and the frame-path part (NVENC, NVDEC, the zero-copy
stream) cannot run at all. A call carries at most 64 MiB with the tree, so the bundle holds only what the machine
lacks, at the versions our pyproject asks for, installed for its Python and platform, trimmed (PyNvVideoCodec ships
its FFmpeg source tarball, sample notebooks and each library three times) and xz-compressed: about 40 MB.

`activate()` is what gpu-check calls first: it unpacks the archive once into the temp folder and puts it first on
this process's path and on every child's PYTHONPATH. Without an archive it does nothing (a machine with the
project's venv needs none).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLE_DIR = ROOT / ".gpu-bundle"
ARCHIVE = BUNDLE_DIR / "site.tar.xz"  # and manifest.json beside it
TRAVEL_LIMIT_BYTES = 64 * 2**20  # one device call's tree and carried paths together

TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
# Beyond the project's own dependencies: NVENC (serve/webrtc/encoders.py) and the async gpu-marked tests.
EXTRA_REQUIREMENTS = ("pynvvideocodec>=2.2", "pytest-asyncio>=0.24")
# Already on the machine's image (KINDS.md's package list, read 2026-11-17), at versions that satisfy our pins;
# everything else the resolver brings is carried. huggingface-hub is there too, but at 1.x, below our >=2.4.
ON_THE_MACHINE = frozenset({
    "torch", "numpy", "safetensors", "sentencepiece", "rich", "psutil", "filelock", "pytest", "pluggy",
    "iniconfig", "packaging", "anyio", "httpx", "httpcore", "h11", "idna", "certifi", "click",
    "pygments", "markdown-it-py", "mdurl", "typing-extensions", "pyyaml", "multidict", "fsspec", "tqdm", "hf-xet",
    "requests", "urllib3", "charset-normalizer", "shellingham", "typer", "jinja2", "markupsafe", "sympy", "mpmath",
    "networkx", "triton", "setuptools",
})  # fmt: skip
# What the bundle's packages install that the machine never needs, by path under the install folder. PyNvVideoCodec's
# top-level `benchmarks/` would also shadow ours.
DROP = re.compile(r"^(external|samples|benchmarks|bin|share|include|[^/]*\.data)(/|$)|/tests?/|\.pyi$|__pycache__")
# The packages gpu-check's parts import (module: distribution): `--check` imports each.
IMPORTS = {"msgspec": "msgspec", "ftfy": "ftfy", "litestar": "litestar", "uvicorn": "uvicorn", "aiortc": "aiortc",
           "av": "av", "huggingface_hub": "huggingface-hub", "PyNvVideoCodec": "pynvvideocodec",
           "pytest_asyncio": "pytest-asyncio"}  # fmt: skip


def project_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [r for r in project["dependencies"] if _name(r) not in ON_THE_MACHINE] + list(EXTRA_REQUIREMENTS)


def _name(requirement_or_filename: str) -> str:
    """The canonical project name of a requirement (`av>=18.1,<20`) or a wheel file (`av-19.0.2-cp312-...whl`)."""
    head = re.split(r"[<>=!~;\[ ]|-\d", requirement_or_filename, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", head).lower()


def _platform_args(python: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for platform in TARGET_PLATFORMS:
        args += ["--platform", platform]
    return args


def build(python: str = TARGET_PYTHON, out: Path = ARCHIVE) -> dict:
    """Resolve, download, install for `python` into a folder, trim, archive; returns the manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
        requirements = project_requirements()
        subprocess.run([*pip, "download", "-d", str(wheels), *_platform_args(python), *requirements], check=True)
        carried = sorted(w for w in wheels.glob("*.whl") if _name(w.name) not in ON_THE_MACHINE)
        subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(site), *_platform_args(python),
                        *map(str, carried)], check=True)  # fmt: skip
        dropped = _trim(site)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz", preset=6) as archive:
            archive.add(site, arcname=".")
    manifest = {"python": python, "wheels": [w.name for w in carried], "dropped_bytes": dropped,
                "archive_bytes": out.stat().st_size, "sha256": _sha256(out)}  # fmt: skip
    (out.parent / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _trim(site: Path) -> int:
    """Drop what is never imported; a library shipped under several names keeps one file, the others link to it."""
    dropped = 0
    for path in sorted(site.rglob("*"), key=lambda p: -len(p.parts)):
        relative = path.relative_to(site).as_posix()
        if path.is_file() and not path.is_symlink() and DROP.search(relative):
            dropped += path.stat().st_size
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    seen: dict[tuple[int, str], Path] = {}
    for path in sorted(site.rglob("*.so*")):  # libavformat.so, .so.63 and .so.63.1.101 are the same bytes
        if not path.is_file() or path.is_symlink():
            continue
        key = (path.stat().st_size, _sha256(path))
        if key in seen and seen[key].parent == path.parent:
            dropped += path.stat().st_size
            path.unlink()
            path.symlink_to(seen[key].name)
        else:
            seen.setdefault(key, path)
    return dropped


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def activate(archive: Path | str = ARCHIVE) -> str | None:
    """Unpack the bundle (once per archive) and put it first on the import path, here and in child processes.

    Returns the folder, or None where there is no archive; raises where it was built for another Python."""
    archive = Path(archive)
    if not archive.exists():
        return None
    manifest_path = archive.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest.get("python", python) != python:
        raise RuntimeError(f"{archive} holds packages for Python {manifest['python']}, this is {python}")
    site = Path(tempfile.gettempdir()) / f"wanrt-gpu-bundle-{archive.stat().st_size}-{int(archive.stat().st_mtime)}"
    if not (site / ".unpacked").exists():
        with tarfile.open(archive) as tar:
            tar.extractall(site, filter="data")  # links stay inside the folder; "data" refuses any that do not
        (site / ".unpacked").touch()
    if str(site) not in sys.path:
        sys.path.insert(1 if sys.path and sys.path[0] in ("", os.getcwd()) else 0, str(site))
        importlib.invalidate_caches()
    paths = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return str(site)


def check() -> dict[str, str]:
    """Each carried package's version, or why it does not import (an ABI mismatch shows here, not mid-report)."""
    found = {}
    for module, distribution in IMPORTS.items():
        try:
            importlib.import_module(module)
            found[module] = importlib.metadata.version(distribution)
        except Exception as exc:  # ImportError, or a missing shared library (OSError)
            found[module] = f"{type(exc).__name__}: {exc}"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="unpack and import (on the GPU machine)")
    parser.add_argument("--python", default=TARGET_PYTHON, help="the GPU machine's Python (another one to rehearse)")
    args = parser.parse_args()
    if args.check:
        print(json.dumps({"site": activate(), "imports": check()}, indent=1))
        return
    manifest = build(args.python)
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tree = sum((ROOT / name).stat().st_size for name in listed.decode().split("\0") if (ROOT / name).is_file())
    size = manifest["archive_bytes"]
    print(f"wrote {ARCHIVE.relative_to(ROOT)}: {size / 1e6:.1f} MB, {len(manifest['wheels'])} wheels "
          f"({manifest['dropped_bytes'] / 1e6:.0f} MB trimmed); with the tree ({tree / 1e6:.1f} MB) a call carries "
          f"{(size + tree) / 2**20:.0f} of {TRAVEL_LIMIT_BYTES // 2**20} MiB")  # fmt: skip
    if size + tree > TRAVEL_LIMIT_BYTES * 0.95:
        sys.exit("too close to what one call carries: trim the bundle (DROP) or carry less")
    print("on the GPU machine: run(command='if command -v make; then make gpu-check; else python3 -m "
          "benchmarks.gpu_check; fi', carry=['.gpu-bundle'], timeout_s=600)")  # fmt: skip


if __name__ == "__main__":
    main()
