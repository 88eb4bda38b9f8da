"""The tiny engines the engine tests share: one real AOTInductor build of the tiny SDv2 DiT step and VAE chunk
steps per test session (≈1 min on a CPU), built by the CLI as a user would."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SIZE = 64
PIPELINE = "streamdiffusionv2"
SEED = 42  # the server's default seed, so random weights hash the same at build and at load


def wanrt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True, timeout=600)


def build_args(engines_dir: Path, *extra: str) -> list[str]:
    return ["engines", "build", "--pipeline", PIPELINE, "--height", str(SIZE), "--width", str(SIZE),
            "--random-weights", "--backend", "aoti", "--engines-dir", str(engines_dir), *extra]  # fmt: skip


def build_tiny_engines(folder: Path) -> Path:
    """`wanrt engines build` of the tiny SDv2 engines into `folder`, checked; skips without a C++ compiler."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("AOTInductor on CPU needs a C++ compiler (apt-get install g++)")
    result = wanrt(*build_args(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"built: {PIPELINE} dit_step {SIZE}x{SIZE} fp32 (aoti)" in result.stdout
    for direction in ("encode", "decode"):
        assert f"built: {PIPELINE} vae_{direction} (wan) {SIZE}x{SIZE} fp32 (aoti)" in result.stdout
    return folder
