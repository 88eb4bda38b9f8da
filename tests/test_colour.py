"""kernels/colour.py against swscale (the old path's `to_ndarray("rgb24")`) on really decoded frames, and the Triton
kernels against their torch references under TRITON_INTERPRET=1 on CPU tensors."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import triton_colour
from kernels.colour import Colour, rgb_to_nv12_reference, yuv420_to_rgb_reference
from serve.pipelines.frames import YuvChunk, upload_yuv
from serve.webrtc.planes import read_planes
from tests.support.kernels import interpreted_kernels
from tests.support.scenes import textured_scene

TAGS = [  # (colorspace, color_range) as frames carry them → what the conversion must use
    pytest.param(2, 0, Colour("bt601", False), id="untagged=601-limited"),
    pytest.param(5, 2, Colour("bt601", True), id="601-full"),
    pytest.param(1, 1, Colour("bt709", False), id="709-limited"),
]


def decoded_frames(codec: str, height: int, width: int, count: int = 3) -> list[av.VideoFrame]:
    """A textured scene in motion, encoded and decoded for real (so the planes carry codec noise and padding)."""
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.bit_rate = 2_000_000
    decoder = av.CodecContext.create({"libx264": "h264", "libvpx": "libvpx"}[codec], "r")
    frames: list[av.VideoFrame] = []
    for index in range(count):
        frame = av.VideoFrame.from_ndarray(textured_scene(index, height, width), format="rgb24").reformat(
            format="yuv420p"
        )
        frame.pts = index
        for packet in encoder.encode(frame):
            frames += decoder.decode(packet)
    for packet in encoder.encode(None):
        frames += decoder.decode(packet)
    frames += decoder.decode(None)
    assert len(frames) == count
    return frames


@pytest.fixture(scope="module")
def frames() -> dict[str, list[av.VideoFrame]]:
    # libx264 needs even sizes; VP8 decodes odd ones, whose chroma planes have a half block at the edges.
    return {"even": decoded_frames("libx264", 96, 128), "odd": decoded_frames("libvpx", 49, 65)}


@pytest.fixture(scope="module")
def triton_kernels():
    return interpreted_kernels(triton_colour)


def levels(pixels: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] → [H, W, 3] float on the 0-255 scale (not rounded: the bound is on the value)."""
    return ((pixels + 1) * 127.5).permute(1, 2, 0).numpy()


def as_nv12(frame: av.VideoFrame) -> av.VideoFrame:
    out = frame.reformat(format="nv12")
    out.colorspace, out.color_range = frame.colorspace, frame.color_range
    return out


def even_crop(planes, frame: av.VideoFrame) -> av.VideoFrame:
    """A yuv420p frame of the even top-left part of `planes`, tagged as `frame` is."""
    height, width = frame.height & ~1, frame.width & ~1
    stacked = np.concatenate([
        planes.y[:height, :width].reshape(-1),
        planes.u[: height // 2, : width // 2].reshape(-1),
        planes.v[: height // 2, : width // 2].reshape(-1),
    ]).reshape(height * 3 // 2, width)  # fmt: skip
    even = av.VideoFrame.from_ndarray(stacked, format="yuv420p")
    even.colorspace, even.color_range = frame.colorspace, frame.color_range
    return even


@pytest.mark.parametrize("size", ["even", "odd"])
@pytest.mark.parametrize(("colorspace", "color_range", "expected"), TAGS)
def test_conversion_matches_swscale(frames, size, colorspace, color_range, expected) -> None:
    for frame in frames[size]:
        frame.colorspace, frame.color_range = colorspace, color_range
        for source in (frame, as_nv12(frame)):  # planar and interleaved chroma, padded rows in both
            planes = read_planes(source)
            assert planes.colour == expected
            y, u, v = (torch.from_numpy(p) for p in (planes.y, planes.u, planes.v))
            swscale = frame.to_ndarray(format="rgb24").astype(np.float32)
            exact = levels(yuv420_to_rgb_reference(y, u, v, planes.colour, frame.height, frame.width))
            if size == "odd":
                # swscale's unscaled converter takes even sizes only (its general scaler interpolates chroma for odd
                # ones), so the oracle is swscale on the even part of the same planes: the odd frame's half blocks
                # at the right and bottom edges must not disturb it.
                source_even = even_crop(planes, frame)
                swscale = source_even.to_ndarray(format="rgb24").astype(np.float32)
                exact = exact[: source_even.height, : source_even.width]
            # swscale's fixed-point converter truncates, so its levels sit up to one below the exact value: ours,
            # truncated the same way, within 2 levels; and the exact value within 3.
            error = np.abs(np.floor(exact) - swscale)
            assert error.max() <= 2.0, f"{source.format.name} {size}: {error.max():.2f} levels from swscale"
            assert np.abs(exact - swscale).max() <= 3.0


@pytest.mark.parametrize("size", ["even", "odd"])
def test_nv12_planes_read_through_dlpack_are_those_read_in_place(frames, size) -> None:
    """NVDEC's frames are read through DLPack (serve/webrtc/planes.py `_device_planes`, run on CUDA frames only).
    PyAV exports a host NV12 frame's planes the same way, so here the layout is checked against the in-place read
    of the same frame: the chroma plane comes as [h // 2, w // 2, 2] (read as every other column of [h/2, w], it gave
    half the chroma columns), and an odd frame is its even part."""
    from serve.webrtc.planes import _device_planes

    for frame in frames[size]:
        nv12 = as_nv12(frame)
        expected, got = read_planes(nv12), _device_planes(nv12)
        height, width = frame.height & ~1, frame.width & ~1
        assert got.colour == expected.colour
        assert np.array_equal(got.y.numpy(), expected.y[:height, :width])
        for ours, theirs in ((got.u, expected.u), (got.v, expected.v)):
            assert np.array_equal(ours.numpy(), theirs[: height // 2, : width // 2])


@pytest.mark.parametrize("size", ["even", "odd"])
def test_kernel_equals_reference(frames, triton_kernels, size) -> None:
    """The Triton kernel (interpreted) against its reference: planar and NV12 chroma, padded rows, a full-range tag."""
    frame = frames[size][1]
    frame.colorspace, frame.color_range = 1, 2
    for source in (frame, as_nv12(frame)):
        planes = read_planes(source)
        y, u, v = (torch.from_numpy(p) for p in (planes.y, planes.u, planes.v))
        reference = yuv420_to_rgb_reference(y, u, v, planes.colour, frame.height, frame.width)
        kernel = torch.empty_like(reference)
        triton_colour.yuv420_to_rgb(y, u, v, planes.colour, kernel, triton_kernels)
        torch.testing.assert_close(kernel, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("height", "width"), [(64, 64), (40, 72), (100, 136)])
def test_resize_is_bilinear_after_conversion(frames, triton_kernels, height, width) -> None:
    """The fused resize equals converting at the source size, then F.interpolate (the kernel's oracle); and stays
    near swscale's own bilinear resize (a different filter: a bound on the mean, not per pixel)."""
    frame = frames["even"][1]
    frame.colorspace, frame.color_range = 2, 0
    planes = read_planes(frame)
    y, u, v = (torch.from_numpy(p) for p in (planes.y, planes.u, planes.v))
    full = yuv420_to_rgb_reference(y, u, v, planes.colour, frame.height, frame.width)
    oracle = F.interpolate(full[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    reference = yuv420_to_rgb_reference(y, u, v, planes.colour, height, width)
    torch.testing.assert_close(reference, oracle, atol=1e-5, rtol=0)
    kernel = torch.empty_like(reference)
    triton_colour.yuv420_to_rgb(y, u, v, planes.colour, kernel, triton_kernels)
    torch.testing.assert_close(kernel, reference, atol=1e-4, rtol=0)
    swscale = frame.reformat(width=width, height=height, format="rgb24", interpolation="BILINEAR").to_ndarray()
    assert np.abs(levels(reference) - swscale).mean() < 6.0


def test_chunk_upload_fills_each_frame(frames) -> None:
    """upload_yuv: a chunk of frames (different sizes too) → [T, 3, H, W] at the loaded size, frame by frame."""
    chunk = YuvChunk(tuple(read_planes(f) for f in [*frames["even"], frames["odd"][0]]))
    pixels = upload_yuv(chunk, torch.device("cpu"), 32, 48)
    assert pixels.shape == (4, 3, 32, 48)
    for index, planes in enumerate(chunk.frames):
        y, u, v = (torch.from_numpy(p) for p in (planes.y, planes.u, planes.v))
        torch.testing.assert_close(pixels[index], yuv420_to_rgb_reference(y, u, v, planes.colour, 32, 48))


def test_rgb_to_nv12_round_trip_and_kernel(triton_kernels) -> None:
    """RGB → NV12 → RGB: within 2 levels where colour is constant over each 2×2 block (quantisation only), and
    within 5 levels on average on the grainy textured scene (chroma subsampling loses detail there, by design)."""
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(16, 240, (24, 32, 3), dtype=torch.uint8, generator=generator)
    flat = blocks.repeat_interleave(2, 0).repeat_interleave(2, 1)  # [48, 64, 3]
    scene = torch.from_numpy(textured_scene(2, 48, 64))
    for colour in (Colour("bt601", False), Colour("bt709", False), Colour("bt601", True)):
        for rgb, bound in ((flat, 2.0), (scene, None)):
            nv12 = rgb_to_nv12_reference(rgb, colour)
            kernel = triton_colour.rgb_to_nv12(rgb, colour, triton_kernels)
            assert off_by_at_most_one(kernel, nv12)  # float sums in another order can round a tie the other way
            y, uv = nv12[:48], nv12[48:].view(24, 32, 2)
            back = levels(yuv420_to_rgb_reference(y, uv[..., 0], uv[..., 1], colour, 48, 64))
            error = np.abs(back - rgb.numpy())
            if bound is not None:
                assert error.max() <= bound, (colour, error.max())
            else:
                assert error.mean() < 5.0, (colour, error.mean())
    # Strided input (a channel-last view of a planar tensor) converts the same.
    planar = flat.permute(2, 0, 1).contiguous()
    kernel = triton_colour.rgb_to_nv12(planar.permute(1, 2, 0), Colour(), triton_kernels)
    assert off_by_at_most_one(kernel, rgb_to_nv12_reference(flat))


def off_by_at_most_one(a: torch.Tensor, b: torch.Tensor) -> bool:
    difference = (a.int() - b.int()).abs()
    return bool(difference.max() <= 1) and bool((difference > 0).float().mean() < 0.01)


def test_nv12_needs_even_sizes() -> None:
    with pytest.raises(ValueError, match="even frame size"):
        rgb_to_nv12_reference(torch.zeros((5, 8, 3), dtype=torch.uint8))


def test_model_stream_takes_yuv_chunks_as_it_takes_swscale_rgb(frames) -> None:
    """The model pipelines' one upload (HostBridge.upload): a YuvChunk becomes the same [1, 3, T, H, W] pixels as
    swscale's RGB of the same frames (within its truncation), and a chunk of planes runs through `process`."""
    from serve.pipelines.frames import HostBridge
    from tests.support.streams import SIZE, open_stream

    stream, params = open_stream("streamdiffusionv2")
    chunk_frames = stream.p.chunk_frames
    decoded = (frames["even"] * chunk_frames)[:chunk_frames]
    for frame in decoded:
        frame.colorspace, frame.color_range = 2, 0
    chunk = YuvChunk(tuple(read_planes(f) for f in decoded))
    rgb = np.stack([f.to_ndarray(format="rgb24") for f in decoded])  # at the source size: colour only
    bridge = HostBridge(torch.device("cpu"), seed=0)
    planes = bridge.upload(chunk, decoded[0].height, decoded[0].width)
    swscale = bridge.upload(rgb, decoded[0].height, decoded[0].width)
    assert planes.shape == swscale.shape == (1, 3, chunk_frames, decoded[0].height, decoded[0].width)
    assert (planes - swscale).abs().max() * 127.5 <= 3.0 and bridge.uploads == 2
    out = stream.process(chunk, {**params, "input_mode": "video"})
    assert out.shape[1:] == (SIZE, SIZE, 3) and out.dtype == np.uint8
    stream.keep_output_on_device = True  # as a session with NVENC sets it: the frames stay where they were made
    kept = stream.process(chunk, {**params, "input_mode": "video"})
    assert isinstance(kept, torch.Tensor) and kept.shape[1:] == (SIZE, SIZE, 3) and kept.dtype == torch.uint8


def test_host_and_device_rgb_to_nv12_agree() -> None:
    """The host path's swscale RGB → NV12 (serve/webrtc/encoders.py) and the kernels' reference agree within 1 level
    on the grainy scene and on noise (swscale's default bilinear decimation was up to 6 / 29 levels off in chroma)."""
    from av.video.reformatter import VideoReformatter

    from serve.webrtc.encoders import host_rgb_to_yuv420

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for rgb in (textured_scene(5, 128, 128), noise):
        host = host_rgb_to_yuv420(VideoReformatter(), rgb).to_ndarray().astype(int)
        device = rgb_to_nv12_reference(torch.from_numpy(rgb)).numpy().astype(int)
        assert np.abs(host - device).max() <= 1
