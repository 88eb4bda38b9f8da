"""Weight files from the Hugging Face hub: download a pipeline's files with resume and progress, and verify them.

Files land exactly where the loader reads them, `ModelFile.local_path(models_dir)` = `<models_dir>/<repo name>/<path>`.
Beside them, `<repo name>/.wanrt/` holds one JSON record per verified file (the hub's etag, size and commit), the
partial downloads (`<path>.<etag>.incomplete`) and a lock per file.

Why not `hf_hub_download(local_dir=...)`: the installed huggingface_hub (2.4, `_download_to_tmp_and_move`, its PR
#4228) downloads into a process-unique temporary file and deletes it on failure, so a stopped multi-GB download starts
again from zero. We keep what huggingface_hub does well — the metadata HEAD with its typed errors, the endpoint and
token handling, and `http_get`, which resumes a dropped connection with a Range request — and own the partial file,
so that the next run resumes it too.

Verification: the hub's etag of an LFS file is the sha256 of its content, that of a plain git file is its git blob
sha1. Both are checked after each download, and `verify_pipeline` re-hashes against the recorded etag offline.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import filelock
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.utils.tqdm import tqdm

from serve.errors import DownloadError
from serve.pipelines.spec import ModelFile, PipelineSpec
from serve.schemas import ModelFileState, ModelsDownloadProgress, ModelsStatus

log = logging.getLogger(__name__)

REVISION = "main"
RECORD_DIR = ".wanrt"
HASH_CHUNK_BYTES = 8 * 2**20
LOCK_POLL_S = 0.5
SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")

State = Literal["idle", "downloading", "done", "error"]
Token = str | bool | None  # huggingface_hub's: None reads HF_TOKEN or the stored login


class DownloadCancelled(Exception):
    """Stopped on request (server shutdown, Ctrl-C); the partial file stays for the next run to resume."""


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about one file at REVISION."""

    file: ModelFile
    url: str
    etag: str
    size_bytes: int
    commit: str
    same_host: bool  # the content is served by the hub itself, not a CDN: the token may go along


@dataclass(frozen=True)
class FileCheck:
    file: ModelFile
    state: Literal["ok", "missing", "corrupt", "unverified"]
    detail: str


@dataclass
class Progress:
    """One pipeline's download. Its thread writes single attributes; readers take what is there (no lock needed)."""

    state: State = "idle"
    bytes_done: int = 0
    bytes_total: int = 0
    current_file: str | None = None
    error: str | None = None

    def snapshot(self) -> ModelsDownloadProgress:
        done, total = self.bytes_done, self.bytes_total
        percentage = 100.0 * done / total if total else (100.0 if self.state == "done" else 0.0)
        return ModelsDownloadProgress(
            state=self.state, is_downloading=self.state == "downloading", bytes_done=done, bytes_total=total,
            percentage=round(percentage, 1), current_artifact=self.current_file, error=self.error,
        )  # fmt: skip


def name_of(file: ModelFile) -> str:
    return f"{file.repo}/{file.path}"


# -- asking the hub ---------------------------------------------------------------------------------------------------


def resolve(file: ModelFile, endpoint: str, token: Token = None, revision: str = REVISION) -> RemoteFile:
    """HEAD the file on the hub at `revision` (a branch or a commit); errors name the repo and file and say what to
    check."""
    url = hf_hub_url(file.repo, file.path, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except RevisionNotFoundError:
        raise DownloadError(
            f"{name_of(file)}: the repo {file.repo} has no revision {revision} on {endpoint} any more (its history "
            "was rewritten during the download?): run the download again"
        ) from None
    except RemoteEntryNotFoundError:
        raise DownloadError(f"{name_of(file)}: the repo {file.repo} has no file {file.path!r} on {endpoint}") from None
    except RepositoryNotFoundError:
        raise DownloadError(
            f"{name_of(file)}: repository {file.repo} not found on {endpoint} (if it is private or gated, set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as exc:
        raise DownloadError(f"{name_of(file)}: {endpoint} answered {exc.response.status_code} for {url}") from None
    except Exception as exc:  # connection refused, timeout, TLS: the message is all the caller can act on
        raise DownloadError(f"{name_of(file)}: cannot reach {endpoint}: {type(exc).__name__}: {exc}") from None
    if meta.etag is None or meta.size is None or meta.commit_hash is None:
        raise DownloadError(f"{name_of(file)}: {url} answered without etag, size or commit: is {endpoint} a hub?")
    if not (SHA256.fullmatch(meta.etag) or GIT_SHA1.fullmatch(meta.etag)):  # it also names the partial file
        raise DownloadError(
            f"{name_of(file)}: {url} answered etag {meta.etag[:80]!r}, neither a sha256 nor a git sha1: the file "
            "could not be verified, so it is not downloaded"
        )
    same_host = urlsplit(meta.location).netloc == urlsplit(url).netloc
    return RemoteFile(file, meta.location, meta.etag, meta.size, meta.commit_hash, same_host)


# -- files on disk ----------------------------------------------------------------------------------------------------


def _side_path(file: ModelFile, models_dir: Path, suffix: str) -> Path:
    """`<repo folder>/.wanrt/<path><suffix>`: bookkeeping that the loader never sees."""
    repo_dir = file.local_path(models_dir).parents[file.path.count("/")]
    return repo_dir / RECORD_DIR / (file.path + suffix)


def record_path(file: ModelFile, models_dir: Path) -> Path:
    return _side_path(file, models_dir, ".json")


def read_record(file: ModelFile, models_dir: Path) -> dict[str, Any] | None:
    """The file's record, or None when there is none or it is not one (hand-edited, another tool's JSON)."""
    try:
        record = json.loads(record_path(file, models_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("etag"), str):
        return None
    if not all(isinstance(record.get(name), int) for name in ("size_bytes", "mtime_ns")):
        return None
    return record


def _recorded(remote: RemoteFile, models_dir: Path) -> bool:
    """The file on disk is the one its record verified against the hub's current etag, unchanged since."""
    record, target = read_record(remote.file, models_dir), remote.file.local_path(models_dir)
    if record is None or record["etag"] != remote.etag or not target.is_file():
        return False
    stat = target.stat()
    return record["mtime_ns"] == stat.st_mtime_ns and record["size_bytes"] == stat.st_size == remote.size_bytes


def write_record(file: ModelFile, models_dir: Path, *, etag: str, size_bytes: int, commit: str | None) -> None:
    """What this file was verified against, and its mtime then: later checks re-hash against the etag offline."""
    path = record_path(file, models_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    mtime_ns = file.local_path(models_dir).stat().st_mtime_ns
    record = {
        "repo": file.repo, "path": file.path, "revision": REVISION, "commit": commit, "etag": etag,
        "size_bytes": size_bytes, "mtime_ns": mtime_ns, "verified_at": time.time(),
    }  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # atomic: a reader sees the old record or the new one


def hash_file(path: Path, etag: str) -> str | None:
    """The content hash in the etag's own kind (sha256 for LFS, git blob sha1 otherwise); None for other etags."""
    if SHA256.fullmatch(etag):
        digest = hashlib.sha256()
    elif GIT_SHA1.fullmatch(etag):
        digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)  # git hashes a header, then the content
    else:
        return None
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _check(path: Path, etag: str, size_bytes: int, source: str) -> str | None:
    """Why the file at `path` is not what `source` describes, or None if it is."""
    size = path.stat().st_size
    if size != size_bytes:
        return f"{path} has {size} bytes, {source} says {size_bytes}"
    digest = hash_file(path, etag)
    if digest is None:
        return f"{path} cannot be checked: {source} gives etag {etag[:80]!r}, neither a sha256 nor a git sha1"
    if digest != etag:
        return f"{path} hashes to {digest}, {source} says {etag}"
    return None


def file_states(spec: PipelineSpec, models_dir: Path) -> list[ModelFileState]:
    """Presence and size of each file, and whether it is unchanged since it was verified; cheap (no hashing)."""
    states = []
    for file in spec.files:
        path = file.local_path(models_dir)
        stat = path.stat() if path.is_file() else None
        record = read_record(file, models_dir)
        verified = bool(
            stat and record and record.get("size_bytes") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
        )
        size_bytes = stat.st_size if stat else None
        states.append(ModelFileState(file.repo, file.path, str(path), stat is not None, size_bytes, verified))
    return states


# -- downloading ------------------------------------------------------------------------------------------------------


def _reporting_bar(on_bytes: Callable[[int], None], cancel: threading.Event) -> type[tqdm]:
    """A silent tqdm class for `http_get`: it reports the current file's bytes and stops the transfer on `cancel`."""

    class ReportingBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.file_bytes = kwargs.get("initial") or 0  # the resumed part, or 0 when the hub ignored the Range
            super().__init__(*args, **{**kwargs, "disable": True})
            on_bytes(self.file_bytes)

        def update(self, n: float | None = 1) -> bool | None:
            if cancel.is_set():
                raise DownloadCancelled("download stopped")
            self.file_bytes += int(n or 0)
            on_bytes(self.file_bytes)
            return None

    return ReportingBar


def _acquire(lock: filelock.FileLock, cancel: threading.Event) -> None:
    """Wait for another thread or process fetching the same file (shared files), but stop on `cancel`."""
    while True:
        try:
            lock.acquire(timeout=LOCK_POLL_S)
            return
        except filelock.Timeout:
            if cancel.is_set():
                raise DownloadCancelled("download stopped") from None


def fetch_file(remote: RemoteFile, models_dir: Path, *, on_bytes: Callable[[int], None], cancel: threading.Event,
               token: Token = None) -> None:  # fmt: skip
    """Make `remote` present and verified at its local path, resuming a partial download left by an earlier run."""
    file, target = remote.file, remote.file.local_path(models_dir)
    if _recorded(remote, models_dir):  # nothing to write, not even a lock: the folder may be a read-only share
        on_bytes(remote.size_bytes)
        return
    lock_path = _side_path(file, models_dir, ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(lock_path)
    _acquire(lock, cancel)
    try:
        if target.is_file() and _already_there(remote, models_dir):
            on_bytes(remote.size_bytes)
            return
        partial = _side_path(file, models_dir, f".{remote.etag}.incomplete")
        for stale in partial.parent.glob(f"{glob.escape(Path(file.path).name)}.*.incomplete"):
            if stale != partial:  # a partial of an older version of the file: its bytes are not this file's
                stale.unlink()
        resume_bytes = partial.stat().st_size if partial.exists() else 0
        if resume_bytes > remote.size_bytes:
            partial.unlink()
            resume_bytes = 0
        log.info("download file=%s size_bytes=%d resume_from=%d", name_of(file), remote.size_bytes, resume_bytes)
        headers = build_hf_headers(token=token) if remote.same_host else {}  # never send the token to a CDN
        try:
            with partial.open("ab") as sink:
                http_get(
                    remote.url, sink, resume_size=resume_bytes, headers=headers, expected_size=remote.size_bytes,
                    displayed_filename=file.path, tqdm_class=_reporting_bar(on_bytes, cancel),
                )  # fmt: skip
        except DownloadCancelled:
            raise
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 416:
                # Nothing past the partial's end, though it is shorter than the hub's size: the hub's content is
                # not what it announced, and resuming would fail the same way every time.
                partial.unlink(missing_ok=True)
                raise DownloadError(
                    f"{name_of(file)}: {remote.url} has no bytes past {resume_bytes} of the {remote.size_bytes} it "
                    "announced; the partial download was removed, run the download again"
                ) from None
            raise DownloadError(f"{name_of(file)}: download from {remote.url} failed: {exc}") from None
        except Exception as exc:  # after http_get's own retries; the partial file stays for the next run
            raise DownloadError(f"{name_of(file)}: download from {remote.url} failed: {exc}") from None
        problem = _check(partial, remote.etag, remote.size_bytes, f"the hub ({remote.url})")
        if problem is not None:
            partial.unlink()
            raise DownloadError(f"{name_of(file)}: downloaded content is wrong: {problem}; run the download again")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
        write_record(file, models_dir, etag=remote.etag, size_bytes=remote.size_bytes, commit=remote.commit)
    finally:
        lock.release()


def _already_there(remote: RemoteFile, models_dir: Path) -> bool:
    """The file on disk is the hub's: by its record when unchanged since, else by hashing it once."""
    file, target = remote.file, remote.file.local_path(models_dir)
    if _recorded(remote, models_dir):
        return True
    if _check(target, remote.etag, remote.size_bytes, "the hub") is not None:
        log.warning("file=%s on disk differs from the hub: downloading it again", target)
        return False
    write_record(file, models_dir, etag=remote.etag, size_bytes=remote.size_bytes, commit=remote.commit)
    return True


def download_pipeline(spec: PipelineSpec, models_dir: Path, endpoint: str, progress: Progress,
                      cancel: threading.Event, token: Token = None) -> None:  # fmt: skip
    """All of the pipeline's files, one after another; raises DownloadError naming the file that failed."""
    progress.state, progress.error = "downloading", None
    # Ask about every file first: the total is known up front, and a wrong name or a disk too small fails before
    # any byte moves. The first answer from each repo pins its commit, and every other lookup of that repo asks for
    # it: a push to the repo during the download cannot mix two versions' files (a DiT of one, its LoRA of the next).
    commits: dict[str, str] = {}
    remotes = []
    for file in spec.files:
        remote = resolve(file, endpoint, token, commits.get(file.repo, REVISION))
        commits.setdefault(file.repo, remote.commit)
        remotes.append(remote)
    progress.bytes_total = sum(r.size_bytes for r in remotes)
    _check_space(remotes, models_dir)
    done_bytes = 0
    for index, remote in enumerate(remotes):
        progress.current_file = name_of(remote.file)
        if index > 0:
            # Asked again just before its transfer: the hub redirects to a CDN link signed for an hour or so, which
            # a file that starts later (after a slow multi-GB one) would find expired.
            remote = resolve(remote.file, endpoint, token, commits[remote.file.repo])

        def on_bytes(file_bytes: int, before: int = done_bytes) -> None:
            progress.bytes_done = before + file_bytes

        fetch_file(remote, models_dir, on_bytes=on_bytes, cancel=cancel, token=token)
        done_bytes += remote.size_bytes
        progress.bytes_done = done_bytes
    progress.current_file = None
    progress.state = "done"
    log.info("download pipeline=%s done files=%d bytes=%d commits=%s", spec.id, len(remotes), done_bytes, commits)


def _check_space(remotes: list[RemoteFile], models_dir: Path) -> None:
    """Raises DownloadError when the bytes still to fetch do not fit on the models folder's disk."""
    needed = 0
    for remote in remotes:
        if not _recorded(remote, models_dir):
            partial = _side_path(remote.file, models_dir, f".{remote.etag}.incomplete")
            needed += remote.size_bytes - (partial.stat().st_size if partial.is_file() else 0)
    existing = next(folder for folder in (models_dir, *models_dir.parents) if folder.exists())
    free_bytes = shutil.disk_usage(existing).free
    if free_bytes < needed:
        raise DownloadError(
            f"the files still to download need {needed} bytes in {models_dir}, {free_bytes} are free (--models-dir / "
            "WANRT_MODELS_DIR picks another disk)"
        )


def verify_pipeline(spec: PipelineSpec, models_dir: Path, endpoint: str | None, token: Token = None) -> list[FileCheck]:
    """Re-hash each file against its download record; a file without one is checked against the hub if reachable."""
    checks = []
    for file in spec.files:
        path = file.local_path(models_dir)
        if not path.is_file():
            checks.append(FileCheck(file, "missing", f"{path} does not exist"))
            continue
        record = read_record(file, models_dir)
        if record is not None:
            etag, size_bytes, commit, source = record["etag"], record["size_bytes"], record.get("commit"), "its record"
        elif endpoint is None:
            checks.append(FileCheck(file, "unverified", f"{path} has no download record and no hub was given"))
            continue
        else:
            try:
                remote = resolve(file, endpoint, token)
            except DownloadError as exc:
                checks.append(FileCheck(file, "unverified", f"{path} has no download record; {exc}"))
                continue
            etag, size_bytes, commit, source = remote.etag, remote.size_bytes, remote.commit, "the hub"
        problem = _check(path, etag, size_bytes, source)
        if problem is not None:
            checks.append(FileCheck(file, "corrupt", problem))
            continue
        if record is None or record["mtime_ns"] != path.stat().st_mtime_ns:
            try:  # later checks of the unchanged file need no hashing; a read-only folder just goes without
                write_record(file, models_dir, etag=etag, size_bytes=size_bytes, commit=commit)
            except OSError as exc:
                log.warning("file=%s verified, but its record could not be written: %s", path, exc)
        checks.append(FileCheck(file, "ok", f"{path} matches {source}"))
    return checks


DownloadKey = tuple[str, tuple[ModelFile, ...]]
"""A download is of a pipeline's files: with VACE's (`with_vace_files`) it is another download than without."""


def download_key(spec: PipelineSpec) -> DownloadKey:
    return spec.id, spec.files


class HubDownloads:
    """Downloads for one models folder: at most one thread per pipeline and file set, off the event loop.

    A second request for a download that is running gets that download's status. `close()` stops them all at the
    next chunk, leaving partial files that the next download resumes.
    """

    def __init__(self, models_dir: Path, endpoint: str, token: Token = None) -> None:
        self.models_dir = models_dir
        self.endpoint = endpoint
        self.token = token
        self._progress: dict[DownloadKey, Progress] = {}
        self._threads: dict[DownloadKey, threading.Thread] = {}
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def start(self, spec: PipelineSpec) -> bool:
        """Start downloading the pipeline's files; False when one is running already or there is nothing to fetch."""
        key = download_key(spec)
        with self._lock:
            if self.running(spec):
                return False
            if not spec.files:
                self._progress[key] = Progress(state="done")
                return False
            progress = self._progress[key] = Progress(state="downloading")
            thread = threading.Thread(target=self._run, args=(spec, progress), name=f"download-{spec.id}", daemon=True)
            self._threads[key] = thread
            thread.start()
            return True

    def _run(self, spec: PipelineSpec, progress: Progress) -> None:
        try:
            download_pipeline(spec, self.models_dir, self.endpoint, progress, self._cancel, self.token)
        except DownloadCancelled:
            progress.error = "download stopped before it finished; downloading again resumes it"
            progress.state = "error"
        except DownloadError as exc:
            log.error("download pipeline=%s failed: %s", spec.id, exc)
            progress.error, progress.state = str(exc), "error"
        except Exception as exc:
            log.exception("download pipeline=%s failed", spec.id)
            progress.error, progress.state = f"{type(exc).__name__}: {exc}", "error"

    def progress(self, spec: PipelineSpec) -> Progress:
        return self._progress.get(download_key(spec)) or Progress()

    def running(self, spec: PipelineSpec) -> bool:
        thread = self._threads.get(download_key(spec))
        return thread is not None and thread.is_alive()

    def status(self, spec: PipelineSpec) -> ModelsStatus:
        files = file_states(spec, self.models_dir)
        return ModelsStatus(
            pipeline_id=spec.id,
            downloaded=all(f.present for f in files),
            files=files,
            progress=self.progress(spec).snapshot(),
        )

    def close(self, timeout_s: float = 15.0) -> None:
        """Stop every download and wait for its thread (blocking: call it off the event loop)."""
        self._cancel.set()
        for thread in list(self._threads.values()):
            thread.join(timeout_s)
