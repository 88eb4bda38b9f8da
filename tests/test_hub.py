"""Weight downloads against a hub look-alike on 127.0.0.1 (tests/support/local_hub.py), through the real
huggingface_hub client: files land where the loader reads them, interrupted transfers resume, bad files are named."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from serve.errors import DownloadError
from serve.hub import HubDownloads, Progress, download_pipeline, record_path, resolve, verify_pipeline
from serve.pipelines.registry import PIPELINES
from serve.pipelines.spec import ModelFile, PipelineSpec
from tests.support.local_hub import LocalHub, run_local_hub
from tests.support.server import run_server

SDV2 = PIPELINES["streamdiffusionv2"]
DIT = SDV2.files[0]  # jerryfeng/StreamDiffusionV2 wan_causal_dmd_v2v/model.pt
CHUNK_BYTES = 10 * 2**20  # huggingface_hub's http_get writes in chunks of this size: resumes start at a multiple
BIG_BYTES = CHUNK_BYTES + 2 * 2**20 + 123  # more than one chunk, so that a cut after the first one leaves bytes


def content_of(file: ModelFile, size_bytes: int = 3000) -> bytes:
    """Distinct bytes per file, so a file landing at another file's path is caught."""
    seed = f"{file.repo}/{file.path}".encode()
    return (seed * (size_bytes // len(seed) + 1))[:size_bytes]


def publish(hub: LocalHub, spec: PipelineSpec, *, big: ModelFile | None = None) -> dict[ModelFile, bytes]:
    published = {}
    for file in spec.files:
        data = content_of(file, BIG_BYTES if file == big else 3000)
        hub.add_file(file.repo, file.path, data)
        published[file] = data
    return published


def wanrt(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps at 80 columns when not on a terminal
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True, env=env, timeout=timeout_s
    )


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalHub]:
    with run_local_hub(tmp_path / "hub") as running:
        yield running


def test_cli_download_puts_files_where_the_loader_reads_them(hub: LocalHub, tmp_path: Path) -> None:
    published = publish(hub, SDV2)
    models_dir = tmp_path / "models"
    assert SDV2.missing_files(models_dir) == list(SDV2.files)

    out = wanrt("models", "download", "streamdiffusionv2", "--models-dir", str(models_dir), "--endpoint", hub.url)

    assert out.returncode == 0, out.stderr
    assert SDV2.missing_files(models_dir) == []
    for file, data in published.items():
        assert file.local_path(models_dir).read_bytes() == data
        assert str(file.local_path(models_dir)) in out.stdout
    assert DIT.local_path(models_dir) == models_dir / "StreamDiffusionV2" / "wan_causal_dmd_v2v" / "model.pt"

    # A second run asks the hub what is current, finds every file verified, and transfers nothing.
    gets_before = sum(r.method == "GET" for r in hub.requests)
    again = wanrt("models", "download", "streamdiffusionv2", "--models-dir", str(models_dir), "--endpoint", hub.url)
    assert again.returncode == 0, again.stderr
    assert sum(r.method == "GET" for r in hub.requests) == gets_before


def test_dropped_connection_resumes_from_the_bytes_received(hub: LocalHub, tmp_path: Path) -> None:
    published = publish(hub, SDV2, big=DIT)
    hub.drop_once(f"{DIT.repo}/{DIT.path}", after_bytes=CHUNK_BYTES + 2**20)
    progress = Progress()

    download_pipeline(SDV2, tmp_path / "models", hub.url, progress, threading.Event())

    assert DIT.local_path(tmp_path / "models").read_bytes() == published[DIT]
    ranges = [r.range for r in hub.gets(DIT.repo, DIT.path)]
    assert ranges == [None, f"bytes={CHUNK_BYTES}-"]  # the retry asked only for what was missing
    assert (progress.state, progress.bytes_done) == ("done", sum(map(len, published.values())))


def test_killed_download_resumes_in_the_next_run(hub: LocalHub, tmp_path: Path) -> None:
    published = publish(hub, SDV2, big=DIT)
    models_dir = tmp_path / "models"
    hub.stall(f"{DIT.repo}/{DIT.path}", after_bytes=CHUNK_BYTES + 2**20)
    args = [sys.executable, "-m", "serve.cli", "models", "download", "streamdiffusionv2"]
    first = subprocess.Popen([*args, "--models-dir", str(models_dir), "--endpoint", hub.url])
    try:
        assert hub.stalled.wait(timeout=30)
        partials = list((models_dir / "StreamDiffusionV2" / ".wanrt").rglob("model.pt.*.incomplete"))
        deadline = time.monotonic() + 10
        while not (partials and partials[0].stat().st_size >= CHUNK_BYTES) and time.monotonic() < deadline:
            time.sleep(0.05)
            partials = list((models_dir / "StreamDiffusionV2" / ".wanrt").rglob("model.pt.*.incomplete"))
        assert partials[0].stat().st_size == CHUNK_BYTES
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: nothing gets to clean up
        first.wait()
    hub.release()

    out = wanrt("models", "download", "streamdiffusionv2", "--models-dir", str(models_dir), "--endpoint", hub.url)

    assert out.returncode == 0, out.stderr
    assert DIT.local_path(models_dir).read_bytes() == published[DIT]
    assert [r.range for r in hub.gets(DIT.repo, DIT.path)] == [None, f"bytes={CHUNK_BYTES}-"]
    assert not list(models_dir.rglob("*.incomplete"))


def test_pipelines_sharing_files_fetch_each_once(hub: LocalHub, tmp_path: Path) -> None:
    """Two pipelines downloading at once both need the Wan VAE and text encoder: one fetches, the other waits."""
    longlive = PIPELINES["longlive"]
    published = {**publish(hub, SDV2), **publish(hub, longlive)}
    runs = [Progress(), Progress()]
    threads = [
        threading.Thread(
            target=download_pipeline, args=(spec, tmp_path / "models", hub.url, progress, threading.Event())
        )
        for spec, progress in zip((SDV2, longlive), runs, strict=True)
    ]
    vae = SDV2.files[1]
    hub.stall(f"{vae.repo}/{vae.path}", after_bytes=1000)
    threads[0].start()
    assert hub.stalled.wait(timeout=30)  # streamdiffusionv2 is fetching the VAE ...
    threads[1].start()
    deadline = time.monotonic() + 30
    while runs[1].current_file != f"{vae.repo}/{vae.path}" and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # ... and longlive has reached the same file, where it waits for the lock
    hub.release()
    for thread in threads:
        thread.join(timeout=60)

    assert [p.state for p in runs] == ["done", "done"]
    for file, data in published.items():
        assert file.local_path(tmp_path / "models").read_bytes() == data
        assert len(hub.gets(file.repo, file.path)) == 1, file


def test_verify_names_a_corrupt_and_a_missing_file_without_the_hub(hub: LocalHub, tmp_path: Path) -> None:
    publish(hub, SDV2)
    models_dir = tmp_path / "models"
    download_pipeline(SDV2, models_dir, hub.url, Progress(), threading.Event())
    offline = "http://127.0.0.1:9"  # nothing listens: the download records are all verify needs
    ok = wanrt("models", "verify", "streamdiffusionv2", "--models-dir", str(models_dir), "--endpoint", offline)
    assert ok.returncode == 0, ok.stderr

    vae, text_encoder = SDV2.files[1], SDV2.files[2]
    data = bytearray(vae.local_path(models_dir).read_bytes())
    data[100] ^= 0xFF  # same size, one byte flipped: only the hash can tell
    vae.local_path(models_dir).write_bytes(bytes(data))
    text_encoder.local_path(models_dir).unlink()

    out = wanrt("models", "verify", "streamdiffusionv2", "--models-dir", str(models_dir), "--endpoint", offline)

    assert out.returncode == 1
    assert f"corrupt {vae.repo}/{vae.path}" in out.stderr
    assert f"missing {text_encoder.repo}/{text_encoder.path}" in out.stderr
    assert f"ok {DIT.repo}/{DIT.path}" in out.stdout
    assert "wanrt models download streamdiffusionv2" in out.stderr


def test_plain_git_files_are_checked_by_their_blob_sha1(hub: LocalHub, tmp_path: Path) -> None:
    """Files outside LFS have a git blob sha1 as etag; a file placed by hand is checked against the hub once."""
    config = ModelFile("org/tiny", "config.json")
    spec = dataclasses.replace(SDV2, files=(config,))
    hub.add_file(config.repo, config.path, b'{"dim": 8}\n')
    models_dir = tmp_path / "models"
    download_pipeline(spec, models_dir, hub.url, Progress(), threading.Event())
    assert config.local_path(models_dir).read_bytes() == b'{"dim": 8}\n'

    record_path(config, models_dir).unlink()
    config.local_path(models_dir).write_bytes(b'{"dim": 9}\n')
    assert [c.state for c in verify_pipeline(spec, models_dir, endpoint=None)] == ["unverified"]
    assert [c.state for c in verify_pipeline(spec, models_dir, endpoint=hub.url)] == ["corrupt"]
    config.local_path(models_dir).write_bytes(b'{"dim": 8}\n')
    assert [c.state for c in verify_pipeline(spec, models_dir, endpoint=hub.url)] == ["ok"]
    assert record_path(config, models_dir).is_file()  # later checks need no hub


def test_download_errors_name_the_repo_and_file(hub: LocalHub, tmp_path: Path) -> None:
    publish(hub, SDV2)
    hub.root.joinpath(DIT.repo, DIT.path).unlink()  # the repo exists, the file does not: the hub's 404
    hub.add_file(DIT.repo, "README.md", b"moved\n")
    models_dir = str(tmp_path / "models")

    out = wanrt("models", "download", "streamdiffusionv2", "--models-dir", models_dir, "--endpoint", hub.url)
    assert out.returncode == 1
    assert f"{DIT.repo}/{DIT.path}" in out.stderr and "has no file" in out.stderr

    out = wanrt("models", "download", "longlive", "--models-dir", models_dir, "--endpoint", hub.url)
    assert out.returncode == 1
    assert "repository Efficient-Large-Model/LongLive-1.3B not found" in out.stderr

    out = wanrt("models", "download", "streamdiffusion", "--models-dir", models_dir, "--endpoint", hub.url)
    assert out.returncode == 2 and "unknown pipeline 'streamdiffusion'" in out.stderr


def test_models_list_names_every_file(tmp_path: Path) -> None:
    out = wanrt("models", "list", "--models-dir", str(tmp_path / "models"))
    assert out.returncode == 0, out.stderr
    for spec in PIPELINES.values():
        for file in spec.files:
            assert f"{file.repo}/{file.path}" in out.stdout
    assert "missing" in out.stdout and "no files needed" in out.stdout


def test_hub_endpoint_comes_from_flag_then_hf_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.cli import build_parser, settings_from_args

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert settings_from_args(build_parser().parse_args(["serve"])).hub_endpoint == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    assert settings_from_args(build_parser().parse_args(["serve"])).hub_endpoint == "http://mirror.example"
    assert build_parser().parse_args(["models", "download", "longlive"]).endpoint == "http://mirror.example"
    args = build_parser().parse_args(["serve", "--hub-endpoint", "http://127.0.0.1:1"])
    assert settings_from_args(args).hub_endpoint == "http://127.0.0.1:1"


def test_api_downloads_in_the_background_one_run_per_pipeline(hub: LocalHub, tmp_path: Path) -> None:
    published = publish(hub, SDV2, big=DIT)
    hub.stall(f"{DIT.repo}/{DIT.path}", after_bytes=CHUNK_BYTES + 2**20)
    with run_server(tmp_path, "--hub-endpoint", hub.url) as server, httpx.Client(base_url=server.url) as api:
        status = api.get("/api/v1/models/status", params={"pipeline_id": "streamdiffusionv2"}).json()
        assert status["downloaded"] is False and status["progress"]["state"] == "idle"
        assert [f["present"] for f in status["files"]] == [False] * 4

        started = api.post("/api/v1/models/download", json={"pipeline_id": "streamdiffusionv2"})
        assert started.status_code == 202, started.text
        progress = poll(api, "streamdiffusionv2", lambda p: p["bytes_done"] >= CHUNK_BYTES)
        assert progress["state"] == "downloading" and progress["is_downloading"]
        assert progress["current_artifact"] == f"{DIT.repo}/{DIT.path}"
        assert progress["bytes_total"] == sum(map(len, published.values()))

        again = api.post("/api/v1/models/download", json={"pipeline_id": "streamdiffusionv2"})
        assert again.status_code == 200 and again.json()["progress"]["state"] == "downloading"
        hub.release()
        progress = poll(api, "streamdiffusionv2", lambda p: p["state"] != "downloading")
        assert (progress["state"], progress["percentage"]) == ("done", 100.0), progress

        status = api.get("/api/v1/models/status", params={"pipeline_id": "streamdiffusionv2"}).json()
        assert status["downloaded"] is True
        assert all(f["present"] and f["verified"] for f in status["files"])
        assert len(hub.gets(DIT.repo, DIT.path)) == 1  # the second POST started nothing

        # A pipeline whose files the hub lacks: the error lands in the status, naming the repo.
        assert api.post("/api/v1/models/download", json={"pipeline_id": "memflow"}).status_code == 202
        progress = poll(api, "memflow", lambda p: p["state"] != "downloading")
        assert progress["state"] == "error" and "KlingTeam/MemFlow" in progress["error"]

        passthrough = api.get("/api/v1/models/status", params={"pipeline_id": "passthrough"}).json()
        assert passthrough["downloaded"] is True and passthrough["files"] == []
        unknown = api.get("/api/v1/models/status", params={"pipeline_id": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"] == "UnknownPipeline"
        unknown = api.post("/api/v1/models/download", json={"pipeline_id": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"] == "UnknownPipeline"
    assert DIT.local_path(tmp_path / "models").read_bytes() == published[DIT]


def poll(
    api: httpx.Client, pipeline_id: str, until: Callable[[dict], bool], timeout_s: float = 30, vace: bool = False
) -> dict:
    """The download progress of `pipeline_id` (with `vace`: of its files and the VACE module's) once `until` holds."""
    deadline = time.monotonic() + timeout_s
    progress: dict = {}
    params = {"pipeline_id": pipeline_id, "vace": vace}
    while time.monotonic() < deadline:
        progress = api.get("/api/v1/models/status", params=params).json()["progress"]
        if until(progress):
            return progress
        time.sleep(0.05)
    raise TimeoutError(f"models status of {pipeline_id} never got there: {progress}")


# -- a hub or a folder that misbehaves --------------------------------------------------------------------------------

BIG, SMALL = ModelFile("org/repo", "big.safetensors"), ModelFile("org/repo", "small.safetensors")
TWO_FILES = dataclasses.replace(SDV2, files=(BIG, SMALL))


def download_in_thread(spec: PipelineSpec, models_dir: Path, hub: LocalHub) -> tuple[threading.Thread, list]:
    """`download_pipeline` on a thread; the list gets its exception, if any."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            download_pipeline(spec, models_dir, hub.url, Progress(), threading.Event())
        except BaseException as exc:  # handed to the test
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, failures


def test_each_file_is_looked_up_again_before_its_transfer_so_its_signed_link_is_fresh(
    hub: LocalHub, tmp_path: Path
) -> None:
    """huggingface.co redirects LFS files to CDN links signed for about an hour: a file that starts after a slow one
    found its link, looked up with every other file's before the first byte, expired (403)."""
    hub.add_file(BIG.repo, BIG.path, content_of(BIG, 300_000))
    hub.add_file(SMALL.repo, SMALL.path, content_of(SMALL))
    hub.cdn_ttl_s = 1.0
    hub.stall(f"{BIG.repo}/{BIG.path}", after_bytes=100_000)
    thread, failures = download_in_thread(TWO_FILES, tmp_path / "models", hub)
    assert hub.stalled.wait(10)
    time.sleep(1.5)  # the first file outlasts every link signed before it started
    hub.release()
    thread.join(30)
    assert not failures, failures
    assert SMALL.local_path(tmp_path / "models").read_bytes() == content_of(SMALL)
    assert any(
        r.method == "GET" and r.path.startswith(f"/cdn/{SMALL.repo}/{hub.head(SMALL.repo)}/{SMALL.path}?")
        for r in hub.requests
    )


def test_a_push_during_a_download_does_not_mix_two_commits_files(hub: LocalHub, tmp_path: Path) -> None:
    """Each file was fetched from `main` as it stood when its own transfer began: a push while the first file
    downloaded gave the second file of the new commit beside the first of the old. Every file of a repo now comes
    from the commit its first lookup answered; the next download brings the new commit whole."""
    models = tmp_path / "models"
    hub.add_file(BIG.repo, BIG.path, content_of(BIG, 300_000))
    hub.add_file(SMALL.repo, SMALL.path, content_of(SMALL))
    first = hub.head(BIG.repo)
    hub.stall(f"{BIG.repo}/{BIG.path}", after_bytes=100_000)
    thread, failures = download_in_thread(TWO_FILES, models, hub)
    assert hub.stalled.wait(10)
    hub.push(SMALL.repo, SMALL.path, b"the next commit's small file")
    second = hub.push(BIG.repo, BIG.path, b"the next commit's big file")
    hub.release()
    thread.join(30)
    assert not failures, failures
    assert BIG.local_path(models).read_bytes() == content_of(BIG, 300_000)
    assert SMALL.local_path(models).read_bytes() == content_of(SMALL)  # the old commit's, as the big one is
    assert [r.path.split("/")[4] for r in hub.gets(SMALL.repo, SMALL.path)] == [first]
    assert {json.loads(record_path(f, models).read_text())["commit"] for f in (BIG, SMALL)} == {first}

    download_pipeline(TWO_FILES, models, hub.url, Progress(), threading.Event())
    assert BIG.local_path(models).read_bytes() == b"the next commit's big file"
    assert SMALL.local_path(models).read_bytes() == b"the next commit's small file"
    assert {json.loads(record_path(f, models).read_text())["commit"] for f in (BIG, SMALL)} == {second}


def test_a_commit_gone_from_the_hub_is_named(hub: LocalHub, tmp_path: Path) -> None:
    hub.add_file(SMALL.repo, SMALL.path, content_of(SMALL))
    with pytest.raises(DownloadError, match=f"no revision {'0' * 40} .*run the download again"):
        resolve(SMALL, hub.url, revision="0" * 40)


def test_a_hub_that_serves_less_than_it_announced_leaves_no_partial_to_resume_forever(
    hub: LocalHub, tmp_path: Path
) -> None:
    publish(hub, SDV2)
    hub.serve_short(f"{DIT.repo}/{DIT.path}", 1000)
    models_dir = tmp_path / "models"
    with pytest.raises(DownloadError):  # 1000 of the 3000 bytes announced: the size check fails, the partial stays
        download_pipeline(SDV2, models_dir, hub.url, Progress(), threading.Event())
    with pytest.raises(DownloadError, match="has no bytes past 1000 of the 3000 it announced"):
        download_pipeline(SDV2, models_dir, hub.url, Progress(), threading.Event())  # resuming at 1000: 416
    hub.short.clear()  # the hub is fixed: the next run starts the file from its first byte
    download_pipeline(SDV2, models_dir, hub.url, Progress(), threading.Event())
    assert DIT.local_path(models_dir).read_bytes() == content_of(DIT)


def test_the_whole_download_must_fit_on_the_disk_before_any_byte_moves(hub: LocalHub, tmp_path: Path) -> None:
    hub.add_file(BIG.repo, BIG.path, content_of(BIG))
    hub.add_file(SMALL.repo, SMALL.path, content_of(SMALL))
    hub.announced[f"{SMALL.repo}/{SMALL.path}"] = 2**60  # the second file cannot fit on any disk
    with pytest.raises(DownloadError, match="still to download need"):
        download_pipeline(TWO_FILES, tmp_path / "models", hub.url, Progress(), threading.Event())
    assert hub.gets(BIG.repo, BIG.path) == []  # the first file was not fetched only to find the second cannot be


def test_an_etag_that_is_no_hash_is_refused_before_it_names_a_file(hub: LocalHub, tmp_path: Path) -> None:
    """The etag names the partial file and is what the content is checked against: anything else is refused."""
    hub.add_file(BIG.repo, BIG.path, content_of(BIG))
    hub.add_file(SMALL.repo, SMALL.path, content_of(SMALL))
    hub.etags[f"{BIG.repo}/{BIG.path}"] = "abc/../../x"
    with pytest.raises(DownloadError, match="neither a sha256 nor a git sha1"):
        download_pipeline(TWO_FILES, tmp_path / "models", hub.url, Progress(), threading.Event())
    assert not list((tmp_path / "models").rglob("*.incomplete")) and hub.gets(BIG.repo, BIG.path) == []


@pytest.mark.parametrize("record", ['"text"', "[]", "{}", '{"etag": 5, "size_bytes": "3000"}'])
def test_a_record_that_is_not_one_is_checked_again_not_a_crash(hub: LocalHub, tmp_path: Path, record: str) -> None:
    publish(hub, SDV2)
    models_dir = tmp_path / "models"
    download_pipeline(SDV2, models_dir, hub.url, Progress(), threading.Event())
    record_path(DIT, models_dir).write_text(record)
    status = HubDownloads(models_dir, hub.url).status(SDV2)
    assert [f.verified for f in status.files] == [False, True, True, True]
    assert verify_pipeline(SDV2, models_dir, endpoint=None)[0].state == "unverified"
    assert [c.state for c in verify_pipeline(SDV2, models_dir, endpoint=hub.url)] == ["ok"] * 4
    assert all(f.verified for f in HubDownloads(models_dir, hub.url).status(SDV2).files)


def test_a_verified_folder_is_not_written_by_a_download_or_a_verify(hub: LocalHub, tmp_path: Path) -> None:
    """Weights shared read-only between machines: a download of files already there and a verify of files their
    records describe write nothing (no lock, no record), so they work on a read-only folder."""
    publish(hub, SDV2)
    models_dir = tmp_path / "models"
    download_pipeline(SDV2, models_dir, hub.url, Progress(), threading.Event())
    for lock in models_dir.rglob("*.lock"):
        lock.unlink()
    before = {path: path.stat().st_mtime_ns for path in models_dir.rglob("*")}
    download_pipeline(SDV2, models_dir, hub.url, Progress(), threading.Event())
    assert [c.state for c in verify_pipeline(SDV2, models_dir, endpoint=None)] == ["ok"] * 4
    assert {path: path.stat().st_mtime_ns for path in models_dir.rglob("*")} == before


def test_a_download_with_vace_files_is_its_own_download(hub: LocalHub, tmp_path: Path) -> None:
    """With VACE's module it is another file set: asked while the plain download runs, it starts (it used to answer
    "already running" and then report that download's `done`, without the VACE file)."""
    with_vace = SDV2.with_vace_files()
    publish(hub, with_vace, big=DIT)
    hub.stall(f"{DIT.repo}/{DIT.path}", after_bytes=CHUNK_BYTES)
    downloads = HubDownloads(tmp_path / "models", hub.url)
    try:
        assert downloads.start(SDV2)
        assert hub.stalled.wait(10)
        assert downloads.start(with_vace)  # not the plain one's: a download of its own
        assert downloads.progress(with_vace).state == "downloading"
        hub.release()
        deadline = time.monotonic() + 30
        while downloads.running(SDV2) or downloads.running(with_vace):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert downloads.progress(SDV2).state == downloads.progress(with_vace).state == "done"
        assert downloads.status(with_vace).downloaded and len(downloads.status(with_vace).files) == 5
    finally:
        downloads.close()
