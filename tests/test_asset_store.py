"""The asset folder as a cluster machine's worker actors share it: each puts the front's uploads under the same name."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from serve.assets import AssetStore
from tests.support.images import png_bytes


def test_puts_of_one_upload_into_a_shared_folder_at_once_all_succeed(tmp_path: Path) -> None:
    """Two actors on one machine are given the same upload at the same time. Each wrote `.<name>.part` and renamed it:
    the first rename took the other's half-written file, and the other's rename then found nothing (its put failed,
    so the front thought that worker lacked the file)."""
    picture = png_bytes(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    name = AssetStore(tmp_path / "front").save("ref.png", picture).name
    stores = [AssetStore(tmp_path / "shared") for _ in range(2)]
    with ThreadPoolExecutor(8) as pool:
        puts = [pool.submit(stores[i % 2].put, name, picture) for i in range(64)]
        for put in puts:
            put.result()
    assert (tmp_path / "shared" / name).read_bytes() == picture
    assert [path.name for path in (tmp_path / "shared").iterdir()] == [name]  # no temporary left


def test_uploads_of_one_name_at_once_each_keep_their_own_file(tmp_path: Path) -> None:
    """Twelve clients upload `race.png` at once (found against a live server): each save found the same free name,
    and a later rename replaced an earlier upload's file, whose path its client had been given."""
    store = AssetStore(tmp_path)
    pictures = [png_bytes(np.full((64, 64, 3), i, np.uint8)) for i in range(32)]
    barrier = threading.Barrier(16)

    def save(picture: bytes):
        barrier.wait()
        return store.save("race.png", picture)

    with ThreadPoolExecutor(16) as pool:
        assets = list(pool.map(save, pictures))
    assert len({asset.path for asset in assets}) == len(pictures)
    for asset, picture in zip(assets, pictures, strict=True):
        assert Path(asset.path).read_bytes() == picture
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(asset.name for asset in assets)  # no temporaries
