"""Engines end to end on CPU (issue 4): `wanrt engines build` of real AOTInductor packages from the tiny random
model (the DiT step and the VAE's encode and decode chunk steps), their manifests, `list` / `verify` / idempotence,
every mismatch reason, a corrupt engine falling back while the server keeps serving, and the `compiled` backends
producing the frames eager produces. TensorRT tests skip where TensorRT or CUDA is absent."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import filelock
import httpx
import msgspec
import numpy as np
import pytest
import torch

from build_engines.manifest import (
    Environment,
    Manifest,
    dit_step_key,
    engine_path,
    mismatch,
    precision_of,
    read_manifest,
    vae_step_key,
)
from serve.errors import PipelineLoadError
from serve.pipelines.autoregressive import StreamDiffusionV2Pipeline
from serve.pipelines.registry import get_spec
from serve.pipelines.weights import random_models
from serve.runtime.backends import select_backend
from serve.schemas import LoadParams
from tests.support.engines import PIPELINE, SEED, SIZE, build_args, wanrt
from tests.support.rtc_client import ScopeClient
from tests.support.server import load_pipeline, run_server

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def wanted_key(backend: str = "aoti"):
    return dit_step_key(PIPELINE, SIZE, SIZE, 1, 6, 32, "fp32", backend)  # type: ignore[arg-type]


def vae_key(direction: str, backend: str = "aoti"):
    return vae_step_key(PIPELINE, direction, "wan", SIZE, SIZE, 1, "fp32", backend)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engines_dir(tiny_engines: Path) -> Path:
    """The session's tiny engines (tests/support/engines.py); tests that change them copy them."""
    return tiny_engines


@pytest.fixture
def engines_copy(engines_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(engines_dir, tmp_path / "engines"))


def the_engine(folder: Path, key=None) -> tuple[Path, Manifest]:
    path = engine_path(folder, key or wanted_key(), Environment.current(CPU))
    return path, read_manifest(path.with_suffix(".json"))


def model():
    return random_models({}, CPU, seed=SEED).dit


def load_sdv2(engines_dir: Path, backend: str = "auto", lora_dir: Path | None = None, **load):
    spec = get_spec(PIPELINE)
    params = spec.effective_load_params(
        LoadParams(height=SIZE, width=SIZE, random_weights=True, backend=backend, **load), allow_random_weights=True
    )
    return StreamDiffusionV2Pipeline.load(
        spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"), engines_dir=engines_dir,
        lora_dir=lora_dir,
    )  # fmt: skip


# -- the CLI --------------------------------------------------------------------------------------------------------


def test_build_writes_a_manifest_lists_it_and_skips_an_up_to_date_rebuild(engines_dir: Path) -> None:
    path, manifest = the_engine(engines_dir)
    assert path.exists() and path.parent.name == f"aoti-{torch.__version__}" and path.parent.parent.name == "cpu"
    assert manifest.key == wanted_key() and manifest.env.gpu == "cpu" and manifest.env.torch == torch.__version__
    assert manifest.tensors["cache_k"]["shape"] == [2, 1, 6 * (SIZE // 16) ** 2, 2, 32]
    assert len(manifest.weight_sha256) == 64 and manifest.built_at.endswith("Z")

    listed = wanrt("engines", "list", "--engines-dir", str(engines_dir))
    assert listed.returncode == 0 and path.name[:30] in listed.stdout and "fits" in listed.stdout

    for direction, x_shape in (("encode", [1, 3, 4, SIZE, SIZE]), ("decode", [1, 16, 1, SIZE // 8, SIZE // 8])):
        vae_path, vae_manifest = the_engine(engines_dir, vae_key(direction))
        assert vae_path.exists() and vae_manifest.key == vae_key(direction)
        assert vae_manifest.tensors["x"] == {"io": "input", "shape": x_shape, "dtype": "float32"}
        assert vae_manifest.weight_sha256 != manifest.weight_sha256  # the VAE's weights, not the DiT's
        assert f"vae_{direction} (wan)" in listed.stdout

    again = wanrt(*build_args(engines_dir))
    assert again.returncode == 0 and again.stdout.count("up to date") == 3, again.stdout + again.stderr
    assert read_manifest(path.with_suffix(".json")).built_at == manifest.built_at  # not rebuilt


def test_the_default_build_precision_on_a_gpu_is_the_one_each_default_load_looks_for() -> None:
    """`make engines` then `make serve` on a Hopper: a load looks for fp8 engines only when it quantizes (Krea by
    default), else those of its dtype (serve/pipelines/autoregressive.py `select_dit_backends`). The default build
    made fp8 on SM89+, so every other pipeline's default load found no engine and ran eager."""
    from build_engines.build import default_precision
    from serve.pipelines.registry import PIPELINES

    hopper = Environment("NVIDIA H200", "90", torch.__version__, None, None)
    for spec in PIPELINES.values():
        if not spec.supports_quantization:  # passthrough: no model, no engine
            continue
        quantization = spec.load_defaults.get("quantization")
        looked_for = "fp8" if quantization else precision_of(torch.bfloat16)  # a GPU load's dtype
        assert default_precision(hopper, quantization) == looked_for, spec.id
    assert default_precision(Environment.current(CPU), None) == "fp32"


def test_a_second_build_of_an_engine_waits_for_the_first_and_then_finds_it_up_to_date(engines_copy: Path) -> None:
    """Two builds of one engine ran at once: both wrote the same temporary package, and the manifest written last
    could name the hash of the file the other build put there. A build now holds the engine's lock from its check
    to its manifest; here the test holds it, as a first build would."""
    path, manifest = the_engine(engines_copy)
    lines: list[str] = []
    with filelock.FileLock(path.with_name(path.name + ".lock")):
        build = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", *build_args(engines_copy)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
        )  # fmt: skip
        assert build.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(build.stdout or ()), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any("waiting for another build" in line for line in lines) and time.monotonic() < deadline:
            assert build.poll() is None, "".join(lines)  # it must not finish while the engine is being built
            time.sleep(0.2)
        assert any(f"waiting for another build of {path.name}" in line for line in lines), "".join(lines)
        time.sleep(1)
        assert build.poll() is None, "".join(lines)
    assert build.wait(timeout=120) == 0
    reader.join(10)
    assert "".join(lines).count("up to date") == 3, "".join(lines)
    assert read_manifest(path.with_suffix(".json")).built_at == manifest.built_at  # found built, not rebuilt


def test_a_merged_lora_runs_on_an_engine_built_with_it(engines_copy: Path, tmp_path: Path) -> None:
    """The merged weights are another engine: the plain one is not used for them; `--lora` builds theirs (the VAE's
    engines are shared: up to date), which then serves the load and gives eager's frames."""
    from tests.support.loras import block_linears, random_factors, write_lora

    lora_dir = tmp_path / "loras"
    write_lora(lora_dir, "comfy_down_up", random_factors(model(), block_linears(2), rank=2, alpha=2.0, seed=1))
    loras = [{"path": "comfy.safetensors", "scale": 0.8}]
    plain = load_sdv2(engines_copy, lora_dir=lora_dir, loras=loras)
    assert plain.backends["dit_step"]["backend"] == "eager", plain.backends
    assert plain.backends["vae_encode"]["backend"] == "compiled"

    built = wanrt(*build_args(engines_copy, "--lora", "comfy.safetensors:0.8", "--lora-dir", str(lora_dir)))
    assert built.returncode == 0, built.stdout + built.stderr
    assert "built: streamdiffusionv2 dit_step" in built.stdout and built.stdout.count("up to date") == 2
    merged = load_sdv2(engines_copy, lora_dir=lora_dir, loras=loras)
    assert merged.backends["dit_step"]["backend"] == "compiled", merged.backends
    eager = load_sdv2(engines_copy, backend="eager", lora_dir=lora_dir, loras=loras)
    spec = get_spec(PIPELINE)
    params = {**spec.runtime_defaults, "input_mode": "text", "prompts": [{"text": "a cat", "weight": 1.0}]}
    ours, reference = merged.open_stream(1), eager.open_stream(1)
    for _ in range(2):
        a, b = ours.process(None, params), reference.process(None, params)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_verify_passes_a_good_engine_and_catches_a_corrupted_one(engines_copy: Path) -> None:
    ok = wanrt("engines", "verify", "--engines-dir", str(engines_copy))
    assert ok.returncode == 0 and ok.stdout.count("OK") == 3, ok.stdout + ok.stderr  # the DiT and both VAE steps
    path, _ = the_engine(engines_copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the package
    path.write_bytes(bytes(data))
    bad = wanrt("engines", "verify", "--engines-dir", str(engines_copy))
    assert bad.returncode == 1 and "corrupt" in bad.stdout, bad.stdout + bad.stderr


def test_clean_removes_only_engines_that_do_not_fit_unless_all(engines_copy: Path) -> None:
    path, manifest = the_engine(engines_copy)
    foreign = engines_copy / "nvidia-h100-sm90" / "tensorrt-11.4.0" / "x.json"
    foreign.parent.mkdir(parents=True)
    env = dataclasses.replace(manifest.env, gpu="NVIDIA H100", sm="90", tensorrt="11.4.0")
    foreign.write_text(dataclasses.replace(manifest, env=env, file="x.plan").to_json())
    stale = path.parent / "stale.json"  # this machine's, built with another torch
    stale.write_text(
        dataclasses.replace(manifest, env=dataclasses.replace(manifest.env, torch="0.0"), file="s").to_json()
    )
    out = wanrt("engines", "clean", "--engines-dir", str(engines_copy))
    assert out.returncode == 0 and "torch 0.0" in out.stdout and "1 engine(s) for other GPUs kept" in out.stdout
    assert not stale.exists() and foreign.exists() and path.exists()  # a shared folder keeps other GPUs' engines
    out = wanrt("engines", "clean", "--other-gpus", "--engines-dir", str(engines_copy))
    assert out.returncode == 0 and "built for sm90 NVIDIA H100, this is cpu" in out.stdout
    assert not foreign.exists() and path.exists()
    assert wanrt("engines", "clean", "--all", "--engines-dir", str(engines_copy)).returncode == 0
    assert not (engines_copy / "cpu").exists()  # emptied folders go; the fixture's own `.built` mark stays


def test_clean_never_deletes_what_is_not_an_engine(engines_copy: Path, tmp_path: Path) -> None:
    """A shared folder may hold any JSON, and `--engines-dir` may be mistyped: `clean` removes engines, their
    manifests and the builds' own leftovers, never a file a manifest names outside its folder nor other files."""
    path, manifest = the_engine(engines_copy)
    victim = tmp_path / "precious" / "weights.safetensors"
    victim.parent.mkdir()
    victim.write_bytes(b"weights")
    stale_env = dataclasses.replace(manifest.env, torch="0.0")  # stale here: plain `clean` removes what it names
    for name, file in (("escape", f"../../../precious/{victim.name}"), ("absolute", str(victim))):
        (path.parent / f"{name}.json").write_text(dataclasses.replace(manifest, env=stale_env, file=file).to_json())
    (path.parent / "backup.json").mkdir()  # a folder named like a manifest
    notes, models = engines_copy / "notes.txt", engines_copy / "models" / "big.pt"
    models.parent.mkdir()
    notes.write_text("ours"), models.write_bytes(b"model")
    leftovers = [path.parent / "timing.cache", path.parent / "x.partial.pt2", path.parent / "wanrt-onnx-1" / "a.onnx"]
    leftovers[2].parent.mkdir()
    for leftover in leftovers:
        leftover.write_bytes(b"")

    listed = wanrt("engines", "list", "--engines-dir", str(engines_copy))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    verified = wanrt("engines", "verify", "--engines-dir", str(engines_copy))
    assert verified.returncode == 1 and verified.stdout.count("must name a file beside the manifest") == 2, (
        verified.stdout + verified.stderr
    )
    assert verified.stdout.count("OK") == 3  # the good engines are still checked
    cleaned = wanrt("engines", "clean", "--engines-dir", str(engines_copy))
    assert cleaned.returncode == 0 and cleaned.stdout.count("unreadable manifest") == 2, cleaned.stdout + cleaned.stderr
    assert victim.exists() and path.exists() and not (path.parent / "escape.json").exists()
    assert wanrt("engines", "clean", "--all", "--engines-dir", str(engines_copy)).returncode == 0
    assert victim.exists() and notes.exists() and models.exists()
    assert not path.exists() and not any(leftover.exists() for leftover in leftovers)


def test_a_malformed_manifest_anywhere_costs_only_itself(engines_copy: Path) -> None:
    """Valid JSON of the wrong shape, in another GPU's folder, made every `auto` load fail with an AttributeError."""
    path, manifest = the_engine(engines_copy)
    other = engines_copy / "nvidia-h100-sm90" / "tensorrt-10.9"
    other.mkdir(parents=True)
    good = msgspec.json.decode(manifest.to_json())
    for name, text in {
        "list": "[]",
        "string": '"x"',
        "null_hash": msgspec.json.encode({**good, "weight_sha256": None}).decode(),
        "number_file": msgspec.json.encode({**good, "file": 5}).decode(),
        "bad_backend": msgspec.json.encode({**good, "key": {**good["key"], "backend": "onnx"}}).decode(),
    }.items():
        (other / f"{name}.json").write_text(text)
    _, backend, why = select_backend("auto", wanted_key(), model(), engines_copy, CPU)
    assert backend == "compiled", why
    for command in ("list", "clean"):
        out = wanrt("engines", command, "--engines-dir", str(engines_copy))
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert path.exists() and not any(other.glob("*.json"))  # unreadable manifests are removed, engines kept


def test_clean_keeps_tensorrt_plans_where_tensorrt_is_not_installed(engines_copy: Path) -> None:
    """Without an importable TensorRT (another venv, a broken library path) a plan cannot be judged stale: a rebuild
    takes minutes, so only `--all` removes it."""
    if Environment.current(CPU).tensorrt is not None:
        pytest.skip("TensorRT is installed here")
    path, manifest = the_engine(engines_copy)
    env = dataclasses.replace(manifest.env, tensorrt="10.9.0.34")
    key = dataclasses.replace(manifest.key, backend="tensorrt")
    plan = path.parent.parent / "tensorrt-10.9.0.34" / "p.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"plan")
    (plan.parent / "p.json").write_text(dataclasses.replace(manifest, env=env, key=key, file="p.plan").to_json())
    out = wanrt("engines", "clean", "--engines-dir", str(engines_copy))
    assert out.returncode == 0 and "1 engine(s) of a backend not installed here kept" in out.stdout, out.stdout
    assert plan.exists()
    assert wanrt("engines", "clean", "--all", "--engines-dir", str(engines_copy)).returncode == 0
    assert not plan.exists()


def test_tensorrt_build_without_tensorrt_fails_saying_so(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the failure this test checks cannot happen")
    except ImportError:
        pass
    out = wanrt(*build_args(tmp_path)[:-4], "--backend", "tensorrt", "--engines-dir", str(tmp_path))
    assert out.returncode == 1 and "TensorRT is not importable" in out.stdout, out.stdout + out.stderr
    assert not any(tmp_path.rglob("*.plan"))


# -- manifest matching ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda m: {"env": dataclasses.replace(m.env, gpu="NVIDIA H100", sm="90")},
            "built for sm90 NVIDIA H100, this is cpu",
        ),
        (lambda m: {"env": dataclasses.replace(m.env, torch="2.11.0")}, f"torch 2.11.0 ≠ {torch.__version__}"),
        (lambda m: {"key": dataclasses.replace(m.key, height=512, width=512)}, f"shape 512x512 ≠ {SIZE}x{SIZE}"),
        (lambda m: {"key": dataclasses.replace(m.key, cache_frames=12)}, "cache_frames 12 ≠ 6"),
        (lambda m: {"weight_sha256": "0" * 64}, "weights differ"),
    ],
    ids=["gpu", "torch", "shape", "cache", "weights"],
)
def test_a_mismatched_manifest_falls_back_to_eager_with_the_reason(engines_copy: Path, change, reason: str) -> None:
    path, manifest = the_engine(engines_copy)
    changed = dataclasses.replace(manifest, **change(manifest))
    changed.write(path)
    weights = model()
    current = Environment.current(CPU)
    from build_engines.manifest import weight_hash

    assert reason in (mismatch(changed, wanted_key(), current, weight_hash(weights)) or "")
    _, backend, why = select_backend("auto", wanted_key(), weights, engines_copy, CPU)
    assert backend == "eager" and reason in why and "compiled:" in why
    with pytest.raises(PipelineLoadError, match=f"backend 'compiled' cannot be used: .*{reason[:12]}"):
        select_backend("compiled", wanted_key(), weights, engines_copy, CPU)


def test_no_engine_says_how_to_build_one(tmp_path: Path) -> None:
    _, backend, why = select_backend("auto", wanted_key(), model(), tmp_path, CPU)
    assert backend == "eager" and "wanrt engines build --pipeline streamdiffusionv2 --height 64" in why


def test_an_engine_that_does_not_load_is_reported_not_run(engines_copy: Path) -> None:
    """Garbage with a consistent manifest (so the hash check passes): the load itself fails, and says so."""
    path, manifest = the_engine(engines_copy)
    path.write_bytes(b"not a zip archive" * 100)
    from build_engines.manifest import file_hash

    dataclasses.replace(manifest, file_sha256=file_hash(path)).write(path)
    _, backend, why = select_backend("auto", wanted_key(), model(), engines_copy, CPU)
    assert backend == "eager" and f"engine {path} failed to load" in why


def test_unreadable_manifest_is_listed_as_such(engines_copy: Path) -> None:
    path, _ = the_engine(engines_copy)
    path.with_suffix(".json").write_text("{not json")
    listed = wanrt("engines", "list", "--engines-dir", str(engines_copy))
    assert listed.returncode == 0 and "unreadable manifest" in listed.stdout
    _, backend, _ = select_backend("auto", wanted_key(), model(), engines_copy, CPU)
    assert backend == "eager"


# -- the compiled backend in the pipeline and the server ------------------------------------------------------------


def frames_equal_eager_over_chunks(eager, compiled, chunks: int) -> None:
    """Both pipelines run `chunks` chunks of the same input: frames within 1 uint8 level, caches within 1e-4, and
    every steady-state step on an engine (none falls back)."""
    spec = get_spec(PIPELINE)
    params = {**spec.runtime_defaults, "prompts": [{"text": "a cat", "weight": 1.0}]}
    rng = np.random.default_rng(0)
    a, b = eager.open_stream(7), compiled.open_stream(7)
    for _ in range(chunks):
        frames = rng.integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
        ours, reference = b.process(frames, params), a.process(frames, params)
        assert ours.shape == reference.shape
        assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1  # uint8 rounding of ≈1e-6 differences
    assert torch.allclose(b.cache.k, a.cache.k, atol=1e-4, rtol=1e-4)  # the copied-back caches too
    # The VAE engines' returned caches, fed to the next chunk. Checked apart from the frames: with the noise mixed in,
    # a wrong encoder cache (an input read with the wrong strides) moved no frame by more than 1 uint8 level.
    for ours_cache, reference_cache in zip((*b.vae._enc_caches, *b.vae._dec_caches),
                                           (*a.vae._enc_caches, *a.vae._dec_caches), strict=True):  # fmt: skip
        assert torch.allclose(ours_cache, reference_cache, atol=1e-4, rtol=1e-4)


def test_compiled_backend_produces_the_frames_eager_produces(engines_dir: Path, caplog) -> None:
    """DiT step and VAE chunk steps all compiled: the first chunk's VAE calls run eager (frame 0 alone), the later
    ones through the VAE engines, with the caches the engines return fed back."""
    eager, compiled = load_sdv2(engines_dir, "eager"), load_sdv2(engines_dir, "auto")
    assert (eager.backend, compiled.backend) == ("eager", "compiled")
    assert "matches" in compiled.backend_reason and "tensorrt:" in compiled.backend_reason
    assert {c: b["backend"] for c, b in compiled.backends.items()} == dict.fromkeys(
        ("dit_step", "vae_encode", "vae_decode"), "compiled"
    )
    assert set(eager.backends) == {"dit_step", "vae_encode", "vae_decode"}
    assert "vae_decode-wan-64x64" in compiled.backends["vae_decode"]["reason"]
    with caplog.at_level("INFO", logger="serve.runtime.backends"):
        frames_equal_eager_over_chunks(eager, compiled, 5)  # past the 3 sink frames: ring slots are overwritten
    assert not [r.message for r in caplog.records if "runs eager" in r.message]  # every steady step on an engine


def test_vae_engines_are_built_and_chosen_per_vae_type(engines_copy: Path) -> None:
    """`--vae-type tae` adds the TAE's chunk steps next to the Wan VAE's; the DiT engine is already up to date, and a
    pipeline loaded with `vae_type: tae` runs the TAE engines (the Wan VAE's do not fit it)."""
    out = wanrt(*build_args(engines_copy), "--vae-type", "tae")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "up to date: streamdiffusionv2 dit_step" in out.stdout
    assert "built: streamdiffusionv2 vae_decode (tae)" in out.stdout
    eager, compiled = load_sdv2(engines_copy, "eager", vae_type="tae"), load_sdv2(engines_copy, "auto", vae_type="tae")
    assert all(choice["backend"] == "compiled" for choice in compiled.backends.values()), compiled.backends
    assert "vae_encode-tae-64x64" in compiled.backends["vae_encode"]["reason"]
    frames_equal_eager_over_chunks(eager, compiled, 3)


def test_a_vae_engine_of_another_resolution_falls_back_to_eager_with_the_reason(engines_copy: Path) -> None:
    path, manifest = the_engine(engines_copy, vae_key("decode"))
    dataclasses.replace(manifest, key=dataclasses.replace(manifest.key, height=128, width=128)).write(path)
    pipeline = load_sdv2(engines_copy, "auto")
    assert (pipeline.backend, pipeline.backends["vae_encode"]["backend"]) == ("compiled", "compiled")
    decode = pipeline.backends["vae_decode"]
    assert decode["backend"] == "eager" and f"shape 128x128 ≠ {SIZE}x{SIZE}" in decode["reason"]
    assert "compiled:" in decode["reason"]
    with pytest.raises(PipelineLoadError, match=r"backend 'compiled' cannot be used for vae_decode: .*shape 128x128"):
        load_sdv2(engines_copy, "compiled")


def test_steps_of_another_shape_run_eager_inside_the_compiled_backend(engines_dir: Path, caplog) -> None:
    """LongLive's re-cache and Krea's recompute run the DiT over more frames than a chunk: not the engine's shape."""
    compiled = load_sdv2(engines_dir, "compiled")
    model = compiled.models.dit
    key = dataclasses.replace(wanted_key(), chunk_frames=2)
    from build_engines.build import dit_step_args

    args = dit_step_args(model, key, CPU)  # two latent frames: the engine was built for one
    call = (args[0], args[1], (args[2], args[3]), args[4], args[5], *args[6:])
    reference_k, reference_v = args[4].clone(), args[5].clone()
    reference = model.step(args[0], args[1], (args[2], args[3]), reference_k, reference_v, *args[6:])
    with caplog.at_level("INFO", logger="serve.runtime.backends"):
        flow = compiled.step(*call)
        compiled.step(*call)
    assert torch.equal(flow, reference) and torch.equal(args[4], reference_k)
    assert sum("runs eager" in r.message for r in caplog.records) == 1  # one line per kind of step, not per call


def test_window_relative_keys_keep_reward_forcing_on_eager_with_the_reason(engines_dir: Path) -> None:
    spec = get_spec("reward-forcing")
    factory = spec.resolve_factory()

    def load(backend: str):
        params = spec.effective_load_params(
            LoadParams(height=SIZE, width=SIZE, random_weights=True, backend=backend), allow_random_weights=True
        )
        return factory.load(spec, params, report=lambda *_: None, models_dir=Path("/nonexistent"),
                            engines_dir=engines_dir)  # fmt: skip

    pipeline = load("auto")
    assert pipeline.backend == "eager" and "window-relative" in pipeline.backend_reason
    with pytest.raises(PipelineLoadError, match="backend 'compiled' cannot be used: reward-forcing re-rotates"):
        load("compiled")


async def test_a_corrupt_engine_falls_back_to_eager_and_the_server_keeps_serving(
    engines_copy: Path, tmp_path: Path
) -> None:
    path, _ = the_engine(engines_copy)
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with run_server(tmp_path, "--allow-random-weights", "--engines-dir", str(engines_copy)) as server:
        status = load_pipeline(server.url, PIPELINE, height=SIZE, width=SIZE, random_weights=True)
        assert status["status"] == "loaded" and status["backend"] == "eager", status
        assert "corrupt" in status["backend_reason"] and path.name in status["backend_reason"]
        assert "corrupt" in server.log() and "backend=eager" in server.log()  # the one log line
        client = ScopeClient(server.url, initial_parameters={"input_mode": "video", "prompts": [{"text": "a"}]})
        await client.connect()
        try:
            await client.wait_frames(4, timeout_s=60)
            stats = await client.wait_message("stats")
            assert stats["backend"] == "eager" and "corrupt" in stats["backend_reason"]
            backends = {component: choice["backend"] for component, choice in stats["backends"].items()}
            assert backends == {"dit_step": "eager", "vae_encode": "compiled", "vae_decode": "compiled"}  # intact
        finally:
            await client.close()
        forced = load_pipeline(server.url, PIPELINE, height=SIZE, width=SIZE, random_weights=True, backend="compiled")
        assert forced["status"] == "error" and "backend 'compiled' cannot be used" in forced["error"]
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200


def test_server_reports_the_compiled_backend_and_why(engines_dir: Path, tmp_path: Path) -> None:
    with run_server(tmp_path, "--allow-random-weights", "--engines-dir", str(engines_dir)) as server:
        status = load_pipeline(server.url, PIPELINE, height=SIZE, width=SIZE, random_weights=True)
        assert status["status"] == "loaded" and status["backend"] == "compiled", status
        assert "matches" in status["backend_reason"]
        assert status["backends"]["dit_step"] == {"backend": "compiled", "reason": status["backend_reason"]}
        assert status["backends"]["vae_encode"]["backend"] == status["backends"]["vae_decode"]["backend"] == "compiled"


# -- TensorRT (GPU machines with TensorRT 11 only) ------------------------------------------------------------------


@pytest.mark.gpu
def test_tensorrt_step_equals_eager_over_chunks(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it comes from NVIDIA's index, not PyPI)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    out = wanrt(*build_args(tmp_path)[:-4], "--backend", "tensorrt", "--precision", "fp32",
                "--engines-dir", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    cuda = torch.device("cuda")
    weights = random_models({}, cuda, seed=SEED).dit
    step, backend, why = select_backend("tensorrt", wanted_key("tensorrt"), weights, tmp_path, cuda)
    assert backend == "tensorrt", why
    from build_engines.build import dit_step_args

    args = dit_step_args(weights, wanted_key("tensorrt"), cuda)
    eager_k, eager_v = args[4].clone(), args[5].clone()
    trt_k, trt_v = args[4].clone(), args[5].clone()
    for t in (1000.0, 750.0, 0.0):  # first call captures the graph, the next ones replay it
        timestep = torch.full_like(args[1], t)
        reference = weights.step(args[0], timestep, (args[2], args[3]), eager_k, eager_v, *args[6:])
        ours = step(args[0], timestep, (args[2], args[3]), trt_k, trt_v, *args[6:])
        assert ((ours - reference).abs().max() / reference.abs().max()).item() <= 1e-3
        assert torch.allclose(trt_k, eager_k, atol=1e-3) and torch.allclose(trt_v, eager_v, atol=1e-3)


@pytest.mark.gpu
def test_tensorrt_vae_chunk_steps_equal_eager_over_chunks(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it comes from NVIDIA's index, not PyPI)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    out = wanrt(*build_args(tmp_path)[:-4], "--backend", "tensorrt", "--precision", "fp32",
                "--engines-dir", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    cuda = torch.device("cuda")
    from serve.pipelines.autoregressive import load_vae_model

    vae = load_vae_model(random_models({}, cuda, seed=SEED), cuda, seed=SEED)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(1, 3, 1 + 4 * 3, SIZE, SIZE, generator=generator) * 2 - 1).to(cuda)
    with torch.no_grad():
        latents, enc_caches = vae.encode_first(pixels[:, :, :1])
        _, dec_caches = vae.decode_first(latents)
        chunks = {
            "encode": (enc_caches, [pixels[:, :, 1 + 4 * i : 5 + 4 * i] for i in range(3)]),
            "decode": (dec_caches, [torch.randn_like(latents) for _ in range(3)]),
        }
        for direction, (caches, inputs) in chunks.items():
            step, backend, why = select_backend("tensorrt", vae_key(direction, "tensorrt"), vae, tmp_path, cuda)
            assert backend == "tensorrt", why
            eager_step = vae.encode_step if direction == "encode" else vae.decode_step
            ours_caches, reference_caches = caches, caches
            for x in inputs:  # the caches each call returns are fed to the next
                ours, ours_caches = step(x, ours_caches)
                reference, reference_caches = eager_step(x, reference_caches)
                assert ((ours - reference).abs().max() / reference.abs().max()).item() <= 1e-3, direction


@pytest.mark.gpu
def test_an_fp8_aoti_step_runs_scaled_mm_and_matches_the_fp8_eager_stream(tmp_path: Path) -> None:
    """`--backend aoti --precision fp8` on SM ≥ 8.9: the served fp8 path (fp8 block weights, `torch._scaled_mm`)
    compiled into the package, chosen by an fp8 load, giving the frames the fp8 eager stream gives."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMMs need a CUDA GPU with SM ≥ 8.9")
    out = wanrt(*build_args(tmp_path), "--precision", "fp8")
    assert out.returncode == 0, out.stdout + out.stderr
    eager = load_sdv2(tmp_path, "eager", quantization="fp8_e4m3fn")
    compiled = load_sdv2(tmp_path, "compiled", quantization="fp8_e4m3fn")
    assert compiled.backend == "compiled", compiled.backend_reason
    params = {**get_spec(PIPELINE).runtime_defaults, "prompts": [{"text": "a cat", "weight": 1.0}]}
    rng = np.random.default_rng(0)
    a, b = eager.open_stream(7), compiled.open_stream(7)
    for _ in range(3):
        frames = rng.integers(0, 255, (4, SIZE, SIZE, 3), dtype=np.uint8)
        ours, reference = b.process(frames, params), a.process(frames, params)
        assert np.abs(ours.astype(int) - reference.astype(int)).mean() <= 2.0  # bf16 + fp8 rounding, two compilers


def test_fp8_engines_need_a_gpu_with_fp8_tensor_cores(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    out = wanrt(*build_args(tmp_path), "--precision", "fp8")
    assert out.returncode != 0 and "fp8 needs SM89+" in out.stdout + out.stderr, out.stdout + out.stderr
