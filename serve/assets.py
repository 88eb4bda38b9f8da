"""Uploaded reference media (VACE images, videos): checked by content, named safely, confined to one folder."""

from __future__ import annotations

import errno
import io
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serve.errors import InsufficientStorage, InvalidRequest, UnknownAsset, UnsupportedMedia
from serve.schemas import Asset

# (magic-byte test, media type, canonical extension). Content decides the type; the client's extension does not.
_SIGNATURES: tuple[tuple[object, str, str], ...] = (
    (lambda b: b.startswith(b"\x89PNG\r\n\x1a\n"), "image", ".png"),
    (lambda b: b.startswith(b"\xff\xd8\xff"), "image", ".jpg"),
    (lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP", "image", ".webp"),
    (lambda b: b[:6] in (b"GIF87a", b"GIF89a"), "image", ".gif"),
    (lambda b: b.startswith(b"BM") and len(b) > 26, "image", ".bmp"),
    (lambda b: b[4:8] == b"ftyp" and b[8:10] == b"qt", "video", ".mov"),
    (lambda b: b[4:8] == b"ftyp", "video", ".mp4"),
    (lambda b: b.startswith(b"\x1a\x45\xdf\xa3"), "video", ".webm"),
    (lambda b: b[:4] == b"RIFF" and b[8:12] == b"AVI ", "video", ".avi"),
)
EXTENSIONS = {ext: kind for _, kind, ext in _SIGNATURES} | {".jpeg": "image", ".mkv": "video"}
MAX_NAME_CHARS = 100
MAX_PATH_CHARS = 1024  # schemas.AssetPath allows no more
MAX_COMPONENT_BYTES = 255  # NAME_MAX: the kernel answers a longer name with ENAMETOOLONG, not "no such file"
# An image is decoded whole (once per stream, then cached encoded), and a small file can hold a huge one: a 190 KB PNG
# decodes to 8000×8000 (192 MB of RGB, half a second of a worker every stream shares). A 6000×4000 photo fits.
MAX_IMAGE_PIXELS = 25_000_000
ECHO_CHARS = 80  # how much of a client's bad path an error message repeats
# The disk is full, the user's quota is spent, or the process may not write files this large (RLIMIT_FSIZE).
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def confined_file(root: Path, path: str) -> Path | None:
    """The regular file `path` names inside the resolved folder `root` (relative to it, or absolute inside it), or
    None for anything else: outside it, hidden, missing, or a string no file can have (NUL, over-long parts).

    The shape is checked before the filesystem sees the string, and OS errors count as "no such file", because
    those errors carry the server's absolute paths and must never reach a reply.
    """
    if not path or len(path) > MAX_PATH_CHARS or "\0" in path:
        return None
    try:
        if any(len(part.encode()) > MAX_COMPONENT_BYTES for part in path.split("/")):
            return None
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root) or resolved.name.startswith(".") or not resolved.is_file():
            return None
    except (OSError, ValueError):  # UnicodeEncodeError (a lone surrogate) is a ValueError
        return None
    return resolved


def echo(text: str) -> str:
    """A client's string, quoted and shortened, for an error message."""
    return repr(text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "…")


def sniff_media(data: bytes) -> tuple[str, str]:
    """(`image` | `video`, extension) from the first bytes; raises UnsupportedMedia for anything else."""
    for test, kind, ext in _SIGNATURES:
        if test(data[:16]):  # type: ignore[operator]
            return kind, ext
    raise UnsupportedMedia(
        "only images (PNG, JPEG, WebP, GIF, BMP) and videos (MP4, MOV, WebM/MKV, AVI) can be uploaded; "
        "the content of this file is neither"
    )


@contextmanager
def opened_image(source: bytes | Path) -> Iterator[Any]:
    """PyAV's container of an image that decodes and holds at most MAX_IMAGE_PIXELS; raises UnsupportedMedia for any
    other. FFmpeg's `max_pixels` makes its probe give up on a larger one before decoding it."""
    import av  # here: the model side imports this module and runs without the media stack (make gpu-check)

    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                            options={"max_pixels": str(MAX_IMAGE_PIXELS)})  # fmt: skip
    except av.error.FFmpegError:
        container = None
    try:
        codec = container.streams.video[0].codec_context if container and container.streams.video else None
        if codec is None or not codec.width or not codec.height:  # what the probe says of one it would not decode
            raise UnsupportedMedia(
                f"the image does not decode, or holds more than {MAX_IMAGE_PIXELS / 1e6:g} megapixels (a 6000×4000 "
                "photo fits); send a smaller PNG, JPEG, WebP, GIF or BMP"
            )
        yield container
    finally:
        if container is not None:
            container.close()


def check_image(source: bytes | Path) -> None:
    """Raises UnsupportedMedia for an image `opened_image` would refuse."""
    with opened_image(source):
        pass


def sanitize_filename(filename: str) -> str:
    """A plain file name: no folders, no leading dots, only letters, digits, '-', '_' and '.'."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip("._")
    stem = Path(name).stem[:MAX_NAME_CHARS] or "upload"
    return stem


def is_upload_name(name: str, data: bytes) -> bool:
    """Whether `save` could have given these bytes this name (what `put` accepts: a file placed in a folder by hand,
    `my photo.PNG`, is no such name)."""
    if not data:
        return False
    try:
        _, ext = sniff_media(data)
    except UnsupportedMedia:
        return False
    return name == f"{sanitize_filename(Path(name).stem)}{ext}"


def claim_free_name(path: Path) -> Path:
    """The first of `path`, `<stem>-1`, `<stem>-2`, … that no file has, taken at once by creating it empty (O_EXCL:
    by any process): two uploads of one name at once each found the same name free, and the later one's rename
    replaced the earlier one's file, whose path its client had been given."""
    candidate, counter = path, 0
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return candidate
        except FileExistsError:
            counter += 1
            candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")


class AssetStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._root = directory.resolve()

    def save(self, filename: str, data: bytes) -> Asset:
        """Runs in a worker thread (uploads can be large)."""
        if not data:
            raise InvalidRequest("the upload is empty; send the file's bytes as the request body")
        kind, ext = sniff_media(data)
        if kind == "image":
            check_image(data)  # a picture the pipelines could not read, or that would stall them, is refused now
        stem = sanitize_filename(filename)
        path = self._write(self._root / f"{stem}{ext}", data, new_name=True)
        return self._describe(path, kind)

    def put(self, name: str, data: bytes) -> Asset:
        """The asset `name` as another store saved it (a cluster front's upload, copied to each worker): the same
        name, so the path the front returned resolves here too; an existing file of that name is replaced."""
        if not is_upload_name(name, data):
            raise InvalidRequest(f"{echo(name)} is not a name this store gives an upload of these bytes")
        path = self._root / name
        self._write(path, data)
        return self._describe(path, sniff_media(data)[0])

    def _write(self, path: Path, data: bytes, new_name: bool = False) -> Path:
        """Writes `data` at `path` (replacing a file of that name), or with `new_name` at the first free one of
        `path`, `<stem>-1`, `<stem>-2`, …; returns where."""
        # Unique to this writer: a machine's worker actors share the folder and are given each upload at once.
        temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
        try:
            temporary.write_bytes(data)
            if new_name:
                path = claim_free_name(path)
            temporary.replace(path)  # readers never see a half-written file
            return path
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            if exc.errno in NO_ROOM_ERRNOS:
                raise InsufficientStorage(
                    f"the server has no room for this {len(data) / 2**20:.1f} MiB upload; free space in its asset "
                    "folder (or ask its operator to) and upload again"
                ) from None
            raise

    def list(self) -> list[Asset]:
        assets = []
        for path in sorted(self._root.iterdir()):
            kind = EXTENSIONS.get(path.suffix.lower())
            if path.is_file() and kind and not path.name.startswith("."):
                assets.append(self._describe(path, kind))
        return assets

    def resolve(self, path: str) -> Path:
        """A served path: relative to the asset folder, or absolute inside it; nothing outside."""
        resolved = confined_file(self._root, path)
        if resolved is None:
            raise UnknownAsset(f"no asset {echo(path)}; GET /api/v1/assets lists them")
        return resolved

    def _describe(self, path: Path, kind: str) -> Asset:
        stat = path.stat()
        return Asset(
            name=path.name,
            path=str(path),
            size_mb=round(stat.st_size / 1e6, 3),
            type=kind,  # type: ignore[arg-type]
            created_at=stat.st_mtime if stat.st_mtime else time.time(),
        )
