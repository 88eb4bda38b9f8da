"""The VACE module is downloaded only when asked for (`wanrt models download <id> --vace`, the download endpoint
with `"vace": true`), against the hub look-alike of tests/test_hub.py."""

from __future__ import annotations

from pathlib import Path

import httpx

from serve.pipelines.registry import PIPELINES
from tests.support.local_hub import LocalHub
from tests.support.server import run_server
from tests.test_hub import hub, poll, publish, wanrt  # noqa: F401 - `hub` is a fixture

LONGLIVE = PIPELINES["longlive"]
(VACE_FILE,) = LONGLIVE.vace_files


def test_cli_downloads_the_vace_module_only_with_vace(hub: LocalHub, tmp_path: Path) -> None:  # noqa: F811
    published = publish(hub, LONGLIVE.with_vace_files())
    models_dir = tmp_path / "models"
    args = ("models", "download", "longlive", "--models-dir", str(models_dir), "--endpoint", hub.url)
    out = wanrt(*args)
    assert out.returncode == 0, out.stderr
    assert LONGLIVE.missing_files(models_dir) == [] and not VACE_FILE.local_path(models_dir).exists()
    assert hub.gets(VACE_FILE.repo, VACE_FILE.path) == []

    out = wanrt(*args, "--vace")
    assert out.returncode == 0, out.stderr
    path = VACE_FILE.local_path(models_dir)
    assert path == models_dir / "WanVideo_comfy" / "Wan2_1-VACE_module_1_3B_bf16.safetensors"
    assert path.read_bytes() == published[VACE_FILE]
    verify = wanrt("models", "verify", "longlive", "--vace", "--models-dir", str(models_dir), "--endpoint", hub.url)
    assert verify.returncode == 0 and "all 6 files verified" in verify.stdout, verify.stdout + verify.stderr


def test_api_downloads_the_vace_module_when_asked(hub: LocalHub, tmp_path: Path) -> None:  # noqa: F811
    krea = PIPELINES["krea-realtime-video"]
    publish(hub, krea.with_vace_files())
    with run_server(tmp_path, "--hub-endpoint", hub.url) as server, httpx.Client(base_url=server.url) as api:
        assert api.post("/api/v1/models/download", json={"pipeline_id": "krea-realtime-video"}).status_code == 202
        poll(api, "krea-realtime-video", lambda p: p["state"] == "done")
        status = api.get("/api/v1/models/status", params={"pipeline_id": "krea-realtime-video", "vace": True}).json()
        assert status["downloaded"] is False  # the module is not fetched unasked
        body = {"pipeline_id": "krea-realtime-video", "vace": True}
        assert api.post("/api/v1/models/download", json=body).status_code == 202
        poll(api, "krea-realtime-video", lambda p: p["state"] == "done", vace=True)
        status = api.get("/api/v1/models/status", params={"pipeline_id": "krea-realtime-video", "vace": True}).json()
        assert status["downloaded"] is True
        assert status["files"][-1]["path"] == "Wan2_1-VACE_module_14B_bf16.safetensors"
