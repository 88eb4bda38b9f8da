"""benchmarks/gpu_bundle.py: what a bare GPU machine lacks, packed here and unpacked there. Building a real bundle
downloads ~75 MB from PyPI (`make gpu-bundle`), so these tests check the parts on archives they write: the trim, the
unpacking onto the import path of this process and its children, and the refusal of another Python's bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_bundle


def test_requirements_are_the_projects_less_what_the_machine_has() -> None:
    requirements = gpu_bundle.project_requirements()
    names = {gpu_bundle._name(r) for r in requirements}
    assert {"msgspec", "ftfy", "litestar", "aiortc", "av", "huggingface-hub", "pynvvideocodec"} <= names
    assert not names & {"torch", "numpy", "safetensors", "rich"}, names
    assert gpu_bundle._name("av-19.0.2-cp312-abi3-manylinux_2_28_x86_64.whl") == "av"
    assert gpu_bundle._name("huggingface_hub>=2.4") == gpu_bundle._name("Huggingface.Hub") == "huggingface-hub"


def test_trim_drops_what_is_never_imported_and_links_copies_of_a_library(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "PyNvVideoCodec").mkdir(parents=True)
    library = os.urandom(4096)
    for name in ("libavformat.so", "libavformat.so.63", "libavformat.so.63.1.101"):
        (site / "PyNvVideoCodec" / name).write_bytes(library)
    (site / "PyNvVideoCodec" / "libavutil.so.61").write_bytes(os.urandom(1024))  # another library: kept
    (site / "PyNvVideoCodec" / "__init__.py").write_text("")
    for junk in ("external/ffmpeg/src/ffmpeg.tar.xz", "samples/tutorial.ipynb", "benchmarks/__init__.py",
                 "PyNvVideoCodec/tests/test_x.py", "PyNvVideoCodec/stub.pyi"):  # fmt: skip
        (site / junk).parent.mkdir(parents=True, exist_ok=True)
        (site / junk).write_bytes(b"x" * 100)
    dropped = gpu_bundle._trim(site)
    assert dropped == 5 * 100 + 2 * 4096
    assert not (site / "external").exists() and not (site / "samples").exists() and not (site / "benchmarks").exists()
    kept = sorted(p.name for p in (site / "PyNvVideoCodec").iterdir())
    assert kept == ["__init__.py", "libavformat.so", "libavformat.so.63", "libavformat.so.63.1.101", "libavutil.so.61"]
    links = [p for p in (site / "PyNvVideoCodec").iterdir() if p.is_symlink()]
    assert len(links) == 2 and all(p.read_bytes() == library for p in (site / "PyNvVideoCodec").glob("libavformat*"))


def write_bundle(root: Path, python: str) -> Path:
    """A bundle holding one module, `bundled_probe`, with a library and a link to it (as the trim leaves them)."""
    site = root / "site"
    (site / "bundled_probe").mkdir(parents=True)
    (site / "bundled_probe" / "__init__.py").write_text("ANSWER = 42\n")
    (site / "bundled_probe" / "libx.so.1.0").write_bytes(b"\x7fELF")
    (site / "bundled_probe" / "libx.so.1").symlink_to("libx.so.1.0")
    archive = root / ".gpu-bundle" / "site.tar.xz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(site, arcname=".")
    (archive.parent / "manifest.json").write_text(json.dumps({"python": python}))
    return archive


def test_activate_unpacks_once_and_puts_the_bundle_first_here_and_in_children(tmp_path: Path) -> None:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    archive = write_bundle(tmp_path, python)
    code = (
        "import os, subprocess, sys\n"
        "from benchmarks.gpu_bundle import activate\n"
        f"site = activate({str(archive)!r})\n"
        "import bundled_probe\n"
        "assert bundled_probe.ANSWER == 42 and os.path.islink(os.path.join(site, 'bundled_probe', 'libx.so.1'))\n"
        "child = subprocess.run([sys.executable, '-c', 'import bundled_probe; print(bundled_probe.__file__)'],\n"
        "                       capture_output=True, text=True, check=True)\n"
        "assert child.stdout.startswith(site), child.stdout\n"
        "print(site)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    root = Path(__file__).resolve().parent.parent
    first = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    site = Path(first.stdout.strip())
    assert site.parent == tmp_path / "tmp" and (site / ".unpacked").exists()
    (site / "bundled_probe" / "__init__.py").write_text("ANSWER = 42  # unpacked once: a second run keeps this\n")
    second = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and Path(second.stdout.strip()) == site, second.stderr
    assert "keeps this" in (site / "bundled_probe" / "__init__.py").read_text()


def test_another_pythons_bundle_is_refused_and_no_bundle_is_nothing(tmp_path: Path) -> None:
    archive = write_bundle(tmp_path, "2.7")
    with pytest.raises(RuntimeError, match=r"Python 2\.7"):
        gpu_bundle.activate(archive)
    assert gpu_bundle.activate(tmp_path / "absent" / "site.tar.xz") is None
