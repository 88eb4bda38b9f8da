"""`make gpu-check DRY=1`: the GPU report's script, run on the tiny config on the CPU so that it cannot rot, with the
web stack made unimportable (a GPU machine may have only the model side installed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEB_STACK = ("litestar", "aiortc", "av", "uvicorn", "httpx")


@pytest.mark.slow
def test_the_dry_gpu_check_runs_every_part_and_writes_both_reports(tmp_path: Path) -> None:
    blocker = tmp_path / "no-web-stack"
    blocker.mkdir()
    for name in WEB_STACK:  # shadows the installed package: importing it fails the part that does
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} must not be needed by gpu_check')\n")
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    parts = ("environment", "dit_step", "attention", "rope", "vae_steps", "pipelines", "adapters")
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(out), "--parts", *parts]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu-report.json").read_text())
    assert report["dry"] is True
    status = {part["part"]: part["status"] for part in report["parts"]}
    assert status == dict.fromkeys(parts, "ok"), report
    parts = {part["part"]: part["result"] for part in report["parts"]}
    assert parts["environment"]["matmul_tflops"] > 0
    assert [row["variant"] for row in parts["dit_step"]["rows"]] == [
        "eager", "eager, window-relative keys (Reward Forcing: the cache rotated at read)", "eager, torch rope",
        "eager, window-relative keys, torch rope", "fp8 storage, eager",
    ]  # fmt: skip
    assert all(row["error"] is None and row["ms"] > 0 for row in parts["dit_step"]["rows"])
    assert [(row["attention"], row["kernel"]) for row in parts["attention"]["rows"]] == [
        ("self (bias)", "MATH"), ("cross", "MATH")
    ] and all(row["ms"] > 0 for row in parts["attention"]["rows"])  # fmt: skip
    rope = parts["rope"]["rows"]
    assert [(row["tensor"], row["variant"]) for row in rope] == [
        (tensor, variant) for tensor in ("chunk queries: norm + rope", "chunk queries: rope", "cached window: rope")
        for variant in ("torch reference", "triton")
    ]  # fmt: skip
    assert all(row["ms"] > 0 and row["max_abs_diff"] == 0 for row in rope if row["variant"] == "torch reference")
    assert all("not on CUDA" in row["error"] for row in rope if row["variant"] == "triton")  # the dispatch's refusal
    assert {row["vae_type"] for row in parts["vae_steps"]["rows"]} == {"wan", "lightvae", "tae", "lighttae"}
    rows = parts["pipelines"]["rows"]
    assert [row["pipeline"] for row in rows] == [
        "streamdiffusionv2", "longlive", "reward-forcing", "memflow", "krea-realtime-video"
    ]  # fmt: skip
    for row in rows:
        assert "error" not in row, row
        assert row["video_fps"] > 0 and row["text_fps"] > 0 and row["text_first_frame_warm_ms"] > 0
    adapters = parts["adapters"]
    assert [row["adapters"] for row in adapters["lora"]] == ["none (or merged)", "1 runtime", "4 runtime"]
    assert all(row["ms"] > 0 for row in adapters["lora"]) and adapters["lora"][2]["flop_added"] > 0
    assert adapters["vace"] and all(row["vace_ms"] > 0 for row in adapters["vace"])
    markdown = (out / "gpu-report.md").read_text()
    assert "| streamdiffusionv2 | 32×32 |" in markdown and "## dit_step" in markdown and "| cross | MATH |" in markdown
    assert "| cached window: rope | 1×144×2×32 | bfloat16 | torch reference |" in markdown
    # Nothing else in the folder: a device call brings back at most 8 files (the parts' own go to a scratch folder).
    assert sorted(p.name for p in out.iterdir()) == ["gpu-report.json", "gpu-report.md"]


@pytest.mark.slow
def test_the_dry_frame_path_part_times_the_codecs_and_streams_through_a_server(tmp_path: Path) -> None:
    """Issue 13's part: on a CPU the software codecs are timed, NVENC and NVDEC say why they cannot run, and one
    old-path stream goes round a real server; on a GPU the same part adds the zero-copy path (`--path gpu`)."""
    out = tmp_path / "report"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry", "--out", str(out), "--parts", "frame_path"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    (part,) = json.loads((out / "gpu-report.json").read_text())["parts"]
    assert part["status"] == "ok", part
    codecs = {(row["step"], row["codec"]): row for row in part["result"]["codecs"]}
    assert codecs["encode", "libx264"]["ms_mean"] > 0 and codecs["encode", "libx264"]["kbps"] > 0
    assert codecs["decode", "libavcodec (1 thread)"]["ms_mean"] > 0
    assert codecs["decode", "libavcodec (1 thread)"]["frames"] == codecs["encode", "libx264"]["frames"] == 10
    assert all("needs a CUDA GPU" in codecs[key]["error"] for key in (("encode", "nvenc"), ("decode", "nvdec")))
    (stream,) = part["result"]["streams"]
    assert stream["path"] == "old" and stream["encoder"] == "aiortc" and stream["input_format"] == "yuv420p", stream
    assert stream["fps_out_min"] > 20 and stream["cpu_pct"] > 0 and stream["threads"], stream
    markdown = (out / "gpu-report.md").read_text()
    assert "| encode | libx264 | 64×64 | 10 |" in markdown and "| old | 1 | aiortc | yuv420p |" in markdown


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path: Path) -> None:
    from benchmarks.gpu_check import markdown, run_part

    failed = run_part("nonexistent_part_is_rejected", tmp_path, dry=True)  # argparse refuses it: exit 2
    assert failed["status"].startswith("failed") and "invalid choice" in failed["log_tail"]
    ok = run_part("environment", tmp_path, dry=True)
    assert ok["status"] == "ok" and ok["result"]["device"] == "cpu"
    text = markdown({"date": "today", "dry": True, "seconds": 1.0, "parts": [failed, ok]})
    assert "| nonexistent_part_is_rejected | failed (exit 2) |" in text and "invalid choice" in text
