"""User LoRAs: every published file layout, merge and runtime adapters against W + scale·(α/r)·B·A, the LoRA folder and
its API, and loads, streams and scale changes through a running server (tiny config, seeded random weights)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from serve.errors import InvalidParameters, PipelineLoadError
from serve.models.checkpoint import CheckpointError
from serve.models.dit import DIT_CONFIGS, WanDiT
from serve.models.lora import LoraLinear, attach_runtime_loras, match_model, merge_lora, read_lora_file
from serve.pipelines.loras import resolve_lora_path
from tests.support.loras import LAYOUTS, Factors, block_linears, random_factors, write_lora
from tests.support.rtc_client import ScopeClient
from tests.support.server import RunningServer, load_pipeline, run_server
from tests.support.streams import PROMPT_A, SIZE, open_stream

CONFIG = DIT_CONFIGS["tiny"]
TARGETS = [*block_linears(CONFIG.num_layers), "text_embedding.0"]  # every block Linear, and one outside the blocks


@pytest.fixture(scope="module")
def base() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(CONFIG).eval()


def model_copy(base: WanDiT) -> WanDiT:
    model = WanDiT(CONFIG).eval()
    model.load_state_dict(base.state_dict())
    return model


def step_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 4, 4, generator=generator)
    context = torch.randn(1, CONFIG.text_len, CONFIG.text_dim, generator=generator)
    return latents, torch.tensor([[500.0, 500.0]]), context


def run(model: WanDiT) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_full(*step_inputs())


# -- file layouts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_merges_to_base_plus_scaled_factors(tmp_path: Path, base: WanDiT, layout: str) -> None:
    """W' = W + scale·(α/r)·B·A for every targeted Linear, α honoured in every layout that carries one."""
    alpha = None if layout == "peft" else 2.0  # rank 4, α 2: factor 0.5, not the 1 a file without α gets
    factors = random_factors(base, TARGETS, rank=4, alpha=alpha, seed=2)
    adapter = match_model(read_lora_file(write_lora(tmp_path, layout, factors)), base)
    assert set(adapter.layers) == set(TARGETS) and adapter.unmatched == ()
    assert adapter.rank == 4 and adapter.base_model() == "tiny"
    model = model_copy(base)
    merge_lora(model, adapter, scale=0.8)
    for name in TARGETS:
        expected = base.get_submodule(name).weight + factors[name].delta(0.8)
        torch.testing.assert_close(model.get_submodule(name).weight, expected, atol=1e-6, rtol=1e-6)
    untouched = "blocks.0.self_attn.norm_q.weight"
    assert torch.equal(model.state_dict()[untouched], base.state_dict()[untouched])


def test_rank_is_read_per_layer_and_unmatched_keys_are_reported(tmp_path: Path, base: WanDiT) -> None:
    factors = random_factors(base, ["blocks.0.self_attn.q"], rank=2, alpha=2.0, seed=3)
    factors |= random_factors(base, ["blocks.1.ffn.2"], rank=6, alpha=3.0, seed=4)
    extra = {
        "diffusion_model.blocks.0.no_such.lora_down.weight": torch.zeros(2, 64),  # a Linear this model lacks
        "diffusion_model.blocks.0.no_such.lora_up.weight": torch.zeros(64, 2),
        "lora_te_text_model_encoder_layers_0_q.hada_w1_a": torch.zeros(2, 2),  # no LoRA layout at all
    }
    adapter = match_model(read_lora_file(write_lora(tmp_path, "comfy_down_up", factors, extra)), base)
    assert {n: layer.rank for n, layer in adapter.layers.items()} == {"blocks.0.self_attn.q": 2, "blocks.1.ffn.2": 6}
    assert set(adapter.unmatched) == {"blocks.0.no_such", "lora_te_text_model_encoder_layers_0_q.hada_w1_a"}
    model = model_copy(base)
    merge_lora(model, adapter, scale=1.0)
    expected = base.blocks[1].ffn[2].weight + factors["blocks.1.ffn.2"].delta(1.0)  # α/r = 0.5 for this layer
    torch.testing.assert_close(model.blocks[1].ffn[2].weight, expected, atol=1e-6, rtol=1e-6)


def test_a_lora_of_another_model_size_or_shape_fails_naming_the_key(tmp_path: Path, base: WanDiT) -> None:
    wide = 1536  # Wan2.1 1.3B's width
    factors = {"blocks.0.self_attn.q": Factors(torch.zeros(1, wide), torch.zeros(wide, 1), None)}
    adapter = read_lora_file(write_lora(tmp_path, "comfy_a_b", factors))
    assert adapter.base_model() == "wan2.1-1.3b"
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q .*wan2\.1-1\.3b"):
        match_model(adapter, base)
    broken = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 64),
              "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 3)}  # fmt: skip
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*blocks\.0\.self_attn\.q"):
        read_lora_file(tmp_path / "broken.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors"):
        read_lora_file(tmp_path / "garbage.safetensors")


# -- runtime adapters ---------------------------------------------------------------------------------------------


def test_runtime_adapters_equal_the_merged_model_and_follow_scale_changes(tmp_path: Path, base: WanDiT) -> None:
    one_file = write_lora(tmp_path / "a", "kohya", random_factors(base, TARGETS, 4, 8.0, 5))
    two_file = write_lora(tmp_path / "b", "diffusers", random_factors(base, TARGETS[:7], 2, 1.0, 6))
    one, two = (match_model(read_lora_file(path), base) for path in (one_file, two_file))
    runtime = model_copy(base)
    loras = attach_runtime_loras(runtime, [("a", one, 0.7), ("b", two, -0.4)])
    assert isinstance(runtime.blocks[0].self_attn.q, LoraLinear)

    def merged(scale_a: float, scale_b: float) -> torch.Tensor:
        model = model_copy(base)
        merge_lora(model, one, scale_a)
        merge_lora(model, two, scale_b)
        return run(model)

    torch.testing.assert_close(run(runtime), merged(0.7, -0.4), atol=1e-5, rtol=1e-5)  # two LoRAs stack
    loras.set_scales({"a": 1.5})  # one adapter's scale; the other keeps its own
    torch.testing.assert_close(run(runtime), merged(1.5, -0.4), atol=1e-5, rtol=1e-5)
    loras.set_scales({"a": 0.0, "b": 0.0})
    assert torch.equal(run(runtime), run(base))  # scale 0 is the base model exactly
    for name in TARGETS:  # the weights themselves were never touched
        assert torch.equal(runtime.get_submodule(name).base.weight, base.get_submodule(name).weight)


def test_builtin_longlive_lora_is_unchanged_by_a_runtime_user_lora(tmp_path: Path) -> None:
    from tests.support.checkpoints import write_pipeline_files

    models_dir, lora_dir = tmp_path / "models", tmp_path / "loras"
    written = write_pipeline_files("longlive", models_dir)
    from serve.pipelines.registry import get_spec
    from serve.schemas import LoadParams

    spec = get_spec("longlive")
    dit_probe = WanDiT(CONFIG)
    write_lora(lora_dir, "comfy_down_up", random_factors(dit_probe, TARGETS, 4, 4.0, 7))
    params = spec.effective_load_params(
        LoadParams(height=SIZE, width=SIZE, loras=[{"path": "comfy.safetensors", "scale": 0.5,
                                                     "merge_mode": "runtime_peft"}]),  # type: ignore[list-item]
        allow_random_weights=False,
    )  # fmt: skip
    pipeline = spec.resolve_factory().load(spec, params, report=lambda *_: None, models_dir=models_dir,
                                           lora_dir=lora_dir)  # fmt: skip
    dit = pipeline.models.dit
    name = "blocks.1.cross_attn.v"
    lora_a, lora_b = written.lora[f"{name}.weight"]
    expected = written.dit[f"{name}.weight"].float() + lora_b.float() @ lora_a.float()  # built-in: α/r = 1
    layer = dit.get_submodule(name)
    assert isinstance(layer, LoraLinear)
    torch.testing.assert_close(layer.base.weight.float(), expected, atol=1e-6, rtol=1e-6)
    assert pipeline.lora_adapters[0]["builtin"] is True and pipeline.lora_adapters[1]["merge_mode"] == "runtime_peft"
    assert pipeline.backend == "eager" and "runtime_peft" in (pipeline.engines_unusable() or "")


# -- through the chunk loop -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    probe = WanDiT(CONFIG)
    write_lora(folder / "styles", "comfy_down_up", random_factors(probe, TARGETS, 4, 4.0, 8))  # styles/comfy...
    write_lora(folder, "kohya", random_factors(probe, TARGETS[:10], 2, 2.0, 9))
    return folder


def chunks(stream, params: dict, count: int, updates: dict[int, dict] | None = None) -> list[np.ndarray]:
    out = []
    for i in range(count):
        params = {**params, **(updates or {}).get(i, {})}
        out.append(stream.process(None, params))
    return out


def test_a_scale_change_reaches_the_next_chunk_and_runtime_equals_merged_in_the_stream(lora_dir: Path) -> None:
    style = "styles/comfy.safetensors"

    def stream_with(mode: str, scale: float):
        return open_stream("longlive", seed=4, lora_dir=lora_dir,
                           loras=[{"path": style, "scale": scale, "merge_mode": mode}])  # fmt: skip

    runtime, params = stream_with("runtime_peft", 1.0)
    merged, _ = stream_with("permanent_merge", 1.0)
    plain, _ = open_stream("longlive", seed=4)
    steered = chunks(runtime, params, 3, {2: {"lora_scales": [{"path": style, "scale": 0.0}]}})
    reference = chunks(merged, params, 3)
    for a, b in zip(steered[:2], reference[:2], strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # runtime = merged (≤ 1 uint8 level)
    assert not np.array_equal(steered[2], reference[2])  # the scale change reached chunk 2
    assert not np.array_equal(reference[0], plain.process(None, params))  # the LoRA does something
    assert runtime.frame == 9  # no reset: the cache was kept across the change

    zero, _ = stream_with("runtime_peft", 0.0)
    plain, _ = open_stream("longlive", seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(chunks(zero, params, 2), chunks(plain, params, 2), strict=True))


def test_lora_paths_outside_the_folder_or_missing_are_refused(lora_dir: Path, tmp_path: Path) -> None:
    assert resolve_lora_path(lora_dir, "kohya.safetensors") == (lora_dir / "kohya.safetensors").resolve()
    (lora_dir / "notes.txt").write_text("not a LoRA")
    for bad, needle in [
        ("../outside.safetensors", "no such file in the LoRA folder"),
        ("/etc/passwd", "no such file in the LoRA folder"),
        ("missing.safetensors", "no such file in the LoRA folder"),
        ("styles", "no such file in the LoRA folder"),  # a folder
        ("notes.txt", "ends in"),
        ("a\0b.safetensors", "no such file in the LoRA folder"),
        ("x" * 300 + ".safetensors", "no such file in the LoRA folder"),
    ]:
        with pytest.raises(InvalidParameters, match=needle):
            resolve_lora_path(lora_dir, bad)
    (lora_dir / "notes.txt").unlink()
    with pytest.raises(PipelineLoadError, match=r"kohya\.safetensors"):  # a 1.3B-shaped file on the tiny model
        wide = tmp_path / "wide"
        write_lora(wide, "kohya", {"blocks.0.self_attn.q": Factors(torch.zeros(1, 1536), torch.zeros(1536, 1), None)})
        open_stream("longlive", lora_dir=wide, loras=[{"path": "kohya.safetensors"}])


# -- through the server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory, lora_dir: Path):
    with run_server(tmp_path_factory.mktemp("lora-server"), "--allow-random-weights", "--lora-dir", str(lora_dir)) as s:
        yield s


def test_the_lora_folder_is_listed_with_rank_base_model_and_sha256(lora_server: RunningServer, lora_dir: Path) -> None:
    (lora_dir / "notes.txt").write_text("not a LoRA")
    (lora_dir / "broken.safetensors").write_bytes(b"garbage")
    try:
        deadline = time.monotonic() + 30
        while True:
            files = {
                f["path"]: f for f in httpx.get(f"{lora_server.url}/api/v1/loras", timeout=10).json()["lora_files"]
            }
            if all(f["sha256"] for f in files.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert set(files) == {"styles/comfy.safetensors", "kohya.safetensors", "broken.safetensors"}
        style = files["styles/comfy.safetensors"]
        assert (style["name"], style["folder"], style["rank"], style["base_model"]) == ("comfy", "styles", 4, "tiny")
        import hashlib

        assert style["sha256"] == hashlib.sha256((lora_dir / "styles/comfy.safetensors").read_bytes()).hexdigest()
        assert files["broken.safetensors"]["error"] and str(lora_dir) not in files["broken.safetensors"]["error"]
        assert files["kohya.safetensors"]["layers"] == 10
    finally:
        (lora_dir / "notes.txt").unlink()
        (lora_dir / "broken.safetensors").unlink()


def test_a_load_that_would_fail_on_its_loras_or_gpus_keeps_the_loaded_pipeline(
    lora_server: RunningServer, lora_dir: Path
) -> None:
    """A LoRA that holds no LoRA (what `GET /api/v1/loras` already says of it) and a GPU this machine does not have
    were found only by the load, after the loaded pipeline and its sessions had been released: now a 422 first."""
    (lora_dir / "broken.safetensors").write_bytes(b"garbage")
    try:
        assert load_pipeline(lora_server.url, "passthrough")["status"] == "loaded"
        for load_params, needle in (
            ({"loras": [{"path": "broken.safetensors"}], "random_weights": True}, "LoRA 'broken.safetensors'"),
            ({"gpus": "99", "random_weights": True}, "gpus 99"),
        ):
            response = httpx.post(f"{lora_server.url}/api/v1/pipeline/load",
                                  json={"pipeline_id": "longlive", "load_params": load_params}, timeout=30)  # fmt: skip
            assert response.status_code == 422 and needle in response.text, response.text
            assert str(lora_dir) not in response.text
            status = httpx.get(f"{lora_server.url}/api/v1/pipeline/status", timeout=5).json()
            assert (status["status"], status["pipeline_id"]) == ("loaded", "passthrough")
    finally:
        (lora_dir / "broken.safetensors").unlink()


async def test_load_stream_and_steer_a_runtime_lora_through_the_server(
    lora_server: RunningServer, lora_dir: Path
) -> None:
    style = "styles/comfy.safetensors"
    status = load_pipeline(
        lora_server.url, "longlive", height=64, width=64, random_weights=True, lora_merge_mode="runtime_peft",
        loras=[{"path": style, "scale": 0.8}, {"path": "kohya.safetensors", "merge_mode": "permanent_merge"}],
    )  # fmt: skip
    assert status["status"] == "loaded", status
    adapters = {a["path"]: a for a in status["loaded_lora_adapters"]}
    assert adapters[style]["merge_mode"] == "runtime_peft" and adapters[style]["scale"] == 0.8
    assert adapters["kohya.safetensors"]["merge_mode"] == "permanent_merge"
    assert "runtime_peft" in status["backend_reason"]

    client = ScopeClient(
        lora_server.url, send_video=False, initial_parameters={"input_mode": "text", "prompts": PROMPT_A}
    )
    await client.connect()
    try:
        await client.wait_frames(12, timeout_s=90)
        await client.send({"lora_scales": [{"path": style, "scale": 0.1}]})
        start = len(client.messages)
        await client.send({"lora_scales": [{"path": "kohya.safetensors", "scale": 0.5}]})  # merged: no live scale
        error = await client.wait_message("error", start=start)
        assert "runtime_peft" in error["message"]
        before = len(client.frames)
        await client.wait_frames(before + 12, timeout_s=90)  # the stream goes on
    finally:
        await client.close()

    (lora_dir / "bad.safetensors").write_bytes(b"\x00" * 64)  # a file in the folder that is no safetensors
    try:
        for loras, needle in [
            ([{"path": "../escape.safetensors"}], "no such file in the LoRA folder"),
            ([{"path": "nope.safetensors"}], "no such file in the LoRA folder"),
            ([{"path": "bad.safetensors"}], "bad.safetensors: not a readable safetensors file"),
        ]:
            response = httpx.post(
                f"{lora_server.url}/api/v1/pipeline/load",
                timeout=10,
                json={"pipeline_id": "longlive", "load_params": {"random_weights": True, "loras": loras}},
            )
            assert response.status_code == 422 and needle in response.json()["detail"], response.text  # fmt: skip
            assert str(lora_server.log_path.parent) not in response.text and str(lora_dir) not in response.text
    finally:
        (lora_dir / "bad.safetensors").unlink()
    assert httpx.get(f"{lora_server.url}/api/v1/pipeline/status", timeout=5).json()["status"] == "loaded"  # kept


def test_runtime_adapters_sit_beside_fp8_stored_weights(lora_dir: Path) -> None:
    """Krea's default fp8 storage: the adapter wraps the Fp8Linear (fp8 applies to the weights, never the factors)."""
    from serve.models.fp8 import Fp8Linear

    style = {"path": "styles/comfy.safetensors", "merge_mode": "runtime_peft"}
    steered, params = open_stream("krea-realtime-video", lora_dir=lora_dir, quantization="fp8_e4m3fn", loras=[style])
    layer = steered.p.models.dit.blocks[0].self_attn.q
    assert isinstance(layer, LoraLinear) and isinstance(layer.base, Fp8Linear)
    plain, _ = open_stream("krea-realtime-video", quantization="fp8_e4m3fn")
    assert not np.array_equal(steered.process(None, params), plain.process(None, params))
    off = {**params, "lora_scales": [{"path": style["path"], "scale": 0.0}]}
    zero, _ = open_stream("krea-realtime-video", lora_dir=lora_dir, quantization="fp8_e4m3fn", loras=[style])
    plain, _ = open_stream("krea-realtime-video", quantization="fp8_e4m3fn")
    assert np.array_equal(zero.process(None, off), plain.process(None, params))


@pytest.mark.browser
def test_the_page_adds_a_lora_to_a_load_and_steers_its_scale_live(lora_server: RunningServer) -> None:
    from tests.support.browser import launch_chromium

    artifacts = Path(__file__).resolve().parents[1] / "artifacts"
    artifacts.mkdir(exist_ok=True)
    style = "styles/comfy.safetensors"
    # From nothing loaded: the module's earlier tests may leave a LoRA pipeline up, whose live controls would show.
    assert httpx.post(f"{lora_server.url}/api/v1/pipeline/unload", json={}, timeout=30).status_code == 200
    with launch_chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        try:
            page.goto(f"{lora_server.url}/")
            page.check("#pipeline-longlive")
            page.wait_for_selector(".lora-file")
            page.get_by_label("Height", exact=True).fill("64")  # not the backend chips' reasons (`--height 64`)
            page.get_by_label("Width", exact=True).fill("64")
            page.get_by_label("Random weights").check()
            row = page.locator(".lora-file", has_text=style)
            row.locator("input[type=checkbox]").check()
            row.locator(".lora-scale").fill("0.6")
            row.locator(".lora-mode").select_option("runtime_peft")
            page.get_by_role("button", name="Load pipeline").click()
            page.wait_for_selector("#lora-live:not([hidden]) input[type=range]", timeout=60_000)
            status = httpx.get(f"{lora_server.url}/api/v1/pipeline/status", timeout=5).json()
            assert [(a["path"], a["scale"], a["merge_mode"]) for a in status["loaded_lora_adapters"]] == [
                (style, 0.6, "runtime_peft")
            ]
            page.select_option("#input-source", "none")
            page.locator("#lora-live input[type=range]").fill("0.3")  # before the stream: its starting scale
            page.get_by_role("button", name="Start stream").click()
            page.wait_for_function("document.getElementById('session-id').textContent.length > 4", timeout=30_000)
            session_id = page.inner_text("#session-id").strip()
            sessions = httpx.get(f"{lora_server.url}/api/v1/webrtc/sessions", timeout=5).json()["sessions"]
            started = next(s for s in sessions if s["sessionId"] == session_id)["parameters"]
            assert started.get("lora_scales") == [{"path": style, "scale": 0.3}], started
            page.locator("#lora-live input[type=range]").fill("-0.5")

            def scales() -> list | None:
                sessions = httpx.get(f"{lora_server.url}/api/v1/webrtc/sessions", timeout=5).json()["sessions"]
                return next(s for s in sessions if s["sessionId"] == session_id)["parameters"].get("lora_scales")

            deadline = time.monotonic() + 20
            while scales() != [{"path": style, "scale": -0.5}]:
                assert time.monotonic() < deadline, scales()
                time.sleep(0.1)
            page.screenshot(path=str(artifacts / "ui_loras.png"), full_page=True)
            page.get_by_role("button", name="Stop stream").click()
        finally:
            context.close()
            httpx.post(f"{lora_server.url}/api/v1/pipeline/unload", json={}, timeout=10)


def test_loras_ticked_for_one_pipeline_are_not_sent_with_another(lora_server: RunningServer) -> None:
    """Choosing a pipeline that takes no LoRAs hid the LoRA rows but left them ticked, and its load sent them: a
    422 about a field the page did not show."""
    from tests.support.browser import launch_chromium

    assert httpx.post(f"{lora_server.url}/api/v1/pipeline/unload", json={}, timeout=30).status_code == 200
    with launch_chromium() as browser:
        page = browser.new_context().new_page()
        page.goto(f"{lora_server.url}/")
        page.check("#pipeline-longlive")
        page.wait_for_selector(".lora-file")
        page.locator(".lora-file", has_text="kohya.safetensors").locator("input[type=checkbox]").check()
        page.check("#pipeline-passthrough")
        page.get_by_role("button", name="Load pipeline").click()
        page.wait_for_function("document.getElementById('load-state-text').textContent.includes(': loaded')")
        assert page.is_hidden("#load-error"), page.inner_text("#load-error")
        status = httpx.get(f"{lora_server.url}/api/v1/pipeline/status", timeout=5).json()
        assert status["pipeline_id"] == "passthrough" and "loras" not in status["load_params"], status
