"""The stream batch in one process (serve/pipelines/stream_batch.py): each chunk gets the plain loop's denoising
(the same timesteps), chunks come out in entry order after the pipe fills, prompt switches and resets drain the
pipe, and policies that cannot stream-batch say why. The staged stream batch against this one-process schedule is
in tests/test_pipeline_parallel.py."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from serve.errors import InvalidParameters
from serve.pipelines.worker import FrameStamp, PipelineWorker, StreamSlot
from tests.support.streams import PROMPT_B, SIZE, open_stream
from tests.test_pipeline_parallel import one_thread  # noqa: F401 - autouse: one torch thread (2 spinning ones crawl here)


def run(stream, params: dict, chunks: int, frames: bool) -> list[np.ndarray]:
    out = []
    for chunk in range(chunks):
        if chunk == 5:
            params = {**params, "prompts": PROMPT_B}
        shape = (stream.p.chunk_frames, stream.p.height, stream.p.width, 3)
        video = np.random.default_rng(chunk).integers(0, 256, shape, dtype=np.uint8) if frames else None
        out.append(stream.process(video, params))
    return out


@pytest.mark.parametrize(
    ("pipeline_id", "mode", "steps"),
    [
        ("streamdiffusionv2", "video", None),  # the noise controller: device-side first steps, maybe-dropped passes
        ("streamdiffusionv2", "text", [500]),  # fewer steps than the load's rows: they ride the rows with no effect
        ("longlive", "text", None),  # LongLive's re-cache after the drain
    ],
)
def test_each_chunk_gets_the_plain_loops_timesteps_in_order(pipeline_id: str, mode: str, steps: list | None) -> None:
    plain, params = open_stream(pipeline_id, seed=3)
    batched, _ = open_stream(pipeline_id, seed=3, stream_batch=True)
    assert batched.p.stream_batch_rows == len(params["denoising_step_list"]) + 1
    params = {**params, "input_mode": mode, **({"denoising_step_list": steps} if steps else {})}
    want = run(plain, params, 8, frames=mode == "video")
    got = run(batched, params, 8, frames=mode == "video")
    steps = batched.p.stream_batch_rows - 1
    # Fill: S calls give no frames; then one chunk per call, and the switch at chunk 5 drains the pipe (the chunks in
    # flight come out with that call) before the new prompt applies.
    assert [len(frames) for frames in got[:steps]] == [0] * steps
    assert len(got[5]) == sum(len(frames) for frames in want[3:5])  # chunks 3 and 4 drained with the switch
    assert len(got[6]) == 0  # refilling
    came_out = [frame for frame, _ in batched.denoised]
    assert came_out == sorted(came_out) and came_out == [frame for frame, _ in plain.denoised][: len(came_out)]
    for (frame, plain_steps), (_, batch_steps) in zip(plain.denoised, batched.denoised, strict=False):
        assert [float(t) for t in batch_steps] == [float(t) for t in plain_steps], f"chunk at frame {frame}"
    assert sum(len(frames) for frames in got) == sum(len(frames) for frames in want[: len(came_out)])
    if pipeline_id == "longlive":
        assert batched.recaches == plain.recaches == 1
    assert all(frames.dtype == np.uint8 for frames in got)


def test_a_policy_that_cannot_stream_batch_runs_without_it_and_says_why() -> None:
    stream, _ = open_stream("reward-forcing", stream_batch=True)
    assert stream.p.stream_batch_rows == 0
    placed = stream.p.placement()
    assert placed is not None and placed["stream_batch"] is False and "EMA sink" in placed["stream_batch_reason"]


def test_a_step_list_longer_than_the_batch_is_refused() -> None:
    stream, _ = open_stream("streamdiffusionv2", stream_batch=True)
    with pytest.raises(InvalidParameters, match="stream batch has rows for 2"):
        stream.p.check_update({"denoising_step_list": [1000, 750, 500]})
    stream.p.check_update({"denoising_step_list": [700]})  # fewer steps ride the rows


def test_frames_keep_their_own_inputs_timestamps_through_the_pipe() -> None:
    """Through the worker: a chunk's frames come out S calls after its inputs went in, stamped with those inputs'
    timestamps (not the inputs of the call they came out of), the drain at a prompt switch included."""
    stream, params = open_stream("streamdiffusionv2", seed=1, stream_batch=True)
    worker, out, errors = PipelineWorker("stream-batch-test"), [], []
    slot = StreamSlot(
        worker, "test", stream, stream.p.chunk_frames, {**params, "input_mode": "video"},
        convert=lambda index: np.full((SIZE, SIZE, 3), index, np.uint8),
        emit=lambda frames, stamps: out.append((len(frames), [stamp.pts for stamp in stamps])),
        output_has_room=lambda frames: True, on_error=errors.append, text_fps=30,
    )  # fmt: skip
    try:
        index = 0
        for chunk in range(6):
            if chunk == 4:
                slot.update_params({"prompts": PROMPT_B})  # the pipe drains: chunks 2 and 3 come out together
            for _ in range(stream.p.chunk_frames):
                slot.push_input(index, FrameStamp(index * 3000, Fraction(1, 90000), None))
                index += 1
            started = slot.start_chunk()  # as the worker thread runs it: start, then the frames out
            assert started is not None
            started.finish()
    finally:
        worker.close()
    assert not errors
    assert [count for count, _ in out] == [0, 0, 1, 4, 8, 0]  # the first chunk decodes to 1 frame (causal VAE)
    pts = [p for _, stamps in out for p in stamps]
    assert pts == [3000 * i for i in [3, *range(4, 16)]]  # chunk 0's newest input, then chunks 1–3's own inputs
