"""VACE images in the worker: a first/last frame image reaches exactly one chunk, the next after it was sent (Scope
pops them once a chunk has its parameters); references hold for every chunk until replaced; the session reports what
was sent."""

from __future__ import annotations

import time

from serve.pipelines.worker import FrameStamp, PipelineWorker
from tests.test_worker import TB, RecordingStream, Sink, make_slot


def push_chunk(slot, start: int, chunk: int) -> None:
    for i in range(start, start + chunk):
        slot.push_input(i, FrameStamp(i, TB, None))


def wait_chunks(stream: RecordingStream, count: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while len(stream.seen) < count:
        assert time.monotonic() < deadline, stream.seen
        time.sleep(0.005)


def test_fflf_images_condition_exactly_one_chunk_and_references_hold_until_replaced() -> None:
    worker = PipelineWorker("test")
    try:
        stream, sink = RecordingStream(), Sink()
        slot = make_slot(worker, stream, sink, 2, vace_ref_images=["/a.png"], vace_context_scale=1.5)
        push_chunk(slot, 0, 2)
        wait_chunks(stream, 1)
        push_chunk(slot, 2, 2)
        wait_chunks(stream, 2)
        slot.update_params({"vace_ref_images": ["/b.png"], "first_frame_image": "/f.png"})
        push_chunk(slot, 4, 2)
        wait_chunks(stream, 3)
        push_chunk(slot, 6, 2)
        wait_chunks(stream, 4)
        slot.update_params({"vace_ref_images": [], "first_frame_image": "/f.png"})  # the same image: one more chunk
        push_chunk(slot, 8, 2)
        wait_chunks(stream, 5)
        seen = [params for _, params in stream.seen]
        assert [p.get("vace_ref_images") for p in seen] == [["/a.png"], ["/a.png"], ["/b.png"], ["/b.png"], []]
        assert [p.get("first_frame_image") for p in seen] == [None, None, "/f.png", None, "/f.png"]
        assert all(p["vace_context_scale"] == 1.5 for p in seen)  # not one-shot: every chunk
        assert slot.params["vace_ref_images"] == [] and slot.params["first_frame_image"] == "/f.png"
    finally:
        worker.close()
