"""The packet path: our encoder's `av.Packet`s (VP8 or H.264) go straight into aiortc's packetizer
(serve/webrtc/encoders.py, serve/webrtc/tracks.py, serve/webrtc/codecs.py), with PLI → keyframe and the receiver's
bitrate estimate applied."""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import torch

from serve.pipelines.worker import FrameStamp
from serve.threads import DECODER, ENCODER, PIPELINE_WORKER
from serve.webrtc.encoders import (
    H264_BASELINE,
    NAL_IDR,
    NAL_PPS,
    NAL_SPS,
    DownloadingFrame,
    LibavEncoder,
    Vp8Encoder,
    X264Encoder,
    as_video_frame,
    nal_types,
    sps_profile,
)
from serve.webrtc.tracks import OutputTrack
from tests.support.frames import read_counter
from tests.support.rtc_client import ScopeClient
from tests.support.scenes import textured_scene
from tests.support.server import RunningServer, load_pipeline, run_server

SIZE = 128
FRAME_INTERVAL_S = 1 / 30
CPU_ENCODERS = pytest.mark.parametrize("encoder_class", [X264Encoder, Vp8Encoder], ids=["libx264", "libvpx"])


def encode_scene(encoder: LibavEncoder, count: int, keyframe_at: set[int]) -> list[av.Packet]:
    images = np.stack([textured_scene(i, SIZE, SIZE) for i in range(count)])
    stamps = [FrameStamp(3000 * i, Fraction(1, 90000), None) for i in range(count)]
    frames = encoder.prepare(images, stamps)
    packets = [encoder.encode(frame, i in keyframe_at) for i, frame in enumerate(frames)]
    assert all(p is not None for p in packets), "no look-ahead: one frame out per frame in, none held back"
    return packets  # type: ignore[return-value]


DECODERS = {"libx264": "h264", "libvpx": "vp8"}  # FFmpeg's own decoder of each CPU encoder's codec


def decode(codec: str, packets: list[av.Packet]) -> list[av.VideoFrame]:
    """Every frame FFmpeg's own `codec` decoder (h264, vp8) makes of `packets`, in order. Its VP8 decoder marks key
    frames; libvpx's wrapper does not."""
    decoder = av.CodecContext.create(codec, "r")
    return [frame for packet in packets for frame in decoder.decode(av.Packet(bytes(packet)))]


def assert_shows(frame: av.VideoFrame, image: np.ndarray) -> None:
    """The picture made it through the conversion and the codec: within 12 levels on average."""
    error = np.abs(frame.to_ndarray(format="rgb24").astype(int) - image).mean()
    assert error < 12, error


def test_x264_writes_baseline_idr_with_headers_and_601_vui() -> None:
    encoder = X264Encoder(1_000_000)
    packets = encode_scene(encoder, 12, keyframe_at={7})
    types = [nal_types(bytes(p)) for p in packets]
    idr = [i for i, t in enumerate(types) if NAL_IDR in t]
    assert idr == [0, 7], types  # the first frame and the requested one; no periodic IDRs in between
    for i in idr:
        assert {NAL_SPS, NAL_PPS} <= set(types[i])  # SPS/PPS in band before every IDR: a browser can join there
    sps = bytes(packets[0]).split(b"\x00\x00\x01")[1]  # the first NAL unit (x264 writes the SPS first)
    assert sps[0] & 0x1F == NAL_SPS and sps[2] & 0x40  # constraint_set1: Constrained Baseline
    assert sps_profile(bytes(packets[0])) == H264_BASELINE
    assert [p.pts for p in packets] == [3000 * i for i in range(12)]  # no reordering: no B-frames
    decoded = decode("h264", packets)
    assert decoded[0].colorspace == 6 and decoded[0].color_range == 1  # VUI: SMPTE 170M (BT.601), limited range
    assert_shows(decoded[5], textured_scene(5, SIZE, SIZE))


def test_the_sps_profile_tells_baseline_from_high() -> None:
    """What the NVENC probe checks its output by (`nvenc_unavailable`): an encoder that writes High profile, which
    aiortc's offer does not allow, is not used."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt, codec.time_base = SIZE, SIZE, "yuv420p", Fraction(1, 30)
    codec.profile = "High"
    frame = av.VideoFrame.from_ndarray(textured_scene(0, SIZE, SIZE), format="rgb24").reformat(format="yuv420p")
    high = b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])
    assert sps_profile(high) == 100 and sps_profile(b"\x00\x00\x01\x65\x88") is None  # an IDR slice, no SPS


def test_h264_on_a_gpu_without_a_working_nvenc_is_libx264_reading_the_device() -> None:
    """A session's encoder (make_encoder, on the event loop) takes NVENC on a CUDA device only once a probe found
    it serves: before a probe has finished, and after one that failed (here PyNvVideoCodec is missing; on an H200
    CreateEncoder fails), H.264 is libx264 from YUV converted on the device. CUDA is never touched here."""
    from serve.webrtc import encoders

    gpu = torch.device("cuda", 0)
    encoders._nvenc_checked.pop(0, None)  # what an earlier probe in this process found
    assert "no probe of GPU 0's NVENC has finished" in str(encoders.nvenc_probed(gpu))
    before = encoders.make_encoder("video/H264", gpu, 1_000_000, "ultrafast", convert_on_device=True)
    assert 0 not in encoders._nvenc_checked  # it did not probe (it runs on the event loop)
    reason = encoders.nvenc_unavailable(gpu)
    assert reason is not None and "PyNvVideoCodec" in reason, reason
    assert encoders.nvenc_probed(gpu) == reason  # found once; make_encoder reads it without probing
    after = encoders.make_encoder("video/H264", gpu, 1_000_000, "ultrafast", convert_on_device=True)
    for encoder in (before, after):
        assert isinstance(encoder, X264Encoder) and encoder.reads_device_memory


def test_vp8_writes_keyframes_where_asked_and_decodes_to_the_scene() -> None:
    encoder = Vp8Encoder(1_000_000)
    packets = encode_scene(encoder, 12, keyframe_at={7})
    keyframes = [i for i, p in enumerate(packets) if encoder.is_keyframe(bytes(p))]
    assert keyframes == [0, 7] and encoder.keyframes == 2, keyframes  # no periodic ones in between
    assert [p.pts for p in packets] == [3000 * i for i in range(12)]  # no reordering, no look-ahead
    decoded = decode("vp8", packets)
    assert [f.key_frame for f in decoded] == [i in (0, 7) for i in range(12)]  # the decoder agrees
    assert_shows(decoded[5], textured_scene(5, SIZE, SIZE))


@CPU_ENCODERS
def test_cpu_encoders_follow_the_target_bitrate(encoder_class: type[LibavEncoder]) -> None:
    low, high = encoder_class(300_000), encoder_class(300_000)
    high.target_bitrate = 3_000_000  # as the output track sets it from the receiver's estimate
    sizes = {name: sum(p.size for p in encode_scene(e, 30, set())[1:]) for name, e in (("low", low), ("high", high))}
    assert sizes["high"] > 2 * sizes["low"], sizes


@CPU_ENCODERS
def test_cpu_encoders_follow_a_change_of_the_target_bitrate_mid_stream(encoder_class: type[LibavEncoder]) -> None:
    """The receiver's estimate changes while the stream runs (the test above sets it before the first frame only):
    the output rate follows it up and down, each change starting with a keyframe."""
    encoder = encoder_class(300_000)
    low = encode_scene(encoder, 30, set())
    encoder.target_bitrate = 3_000_000  # as the output track sets it at the next frame
    high = encode_scene(encoder, 30, set())
    encoder.target_bitrate = 300_000
    low_again = encode_scene(encoder, 30, set())
    assert encoder.is_keyframe(bytes(high[0])) and encoder.is_keyframe(bytes(low_again[0]))
    rate = [sum(p.size for p in packets[1:]) for packets in (low, high, low_again)]  # without each keyframe
    assert rate[1] > 3 * rate[0] and rate[1] > 3 * rate[2], f"the output rate did not follow: {rate}"


@CPU_ENCODERS
def test_cpu_encoders_reopen_for_a_new_bitrate_at_most_once_a_second(encoder_class: type[LibavEncoder]) -> None:
    """Each retune is a keyframe: an estimate that moves every frame must not make every frame a keyframe (aiortc's
    own VP8 encoder would reopen at each of these frames)."""
    encoder = encoder_class(300_000)
    encode_scene(encoder, 30, set())
    keyframes = []
    for second in range(2):  # the target alternates every frame for two seconds of frames
        for i in range(30):
            encoder.target_bitrate = 3_000_000 if i % 2 == 0 else 300_000
            packet = encode_scene(encoder, 1, set())[0]
            if encoder.is_keyframe(bytes(packet)):
                keyframes.append(30 * second + i)
    # One reopen at once; the next at the first frame a second later whose target differs from the open rate.
    assert keyframes == [0, 31], keyframes


@CPU_ENCODERS
def test_cpu_encoders_take_device_frames_as_they_take_host_arrays(encoder_class: type[LibavEncoder]) -> None:
    """Host arrays go through swscale, tensors through kernels/colour.py (the GPU's path, here on the CPU) into
    frames whose copy to the host is in flight (`DownloadingFrame`), in the codec's layout (NV12, or yuv420p's three
    planes): the same values within a level, and the encoder takes those frames as they are."""
    count = 6
    images = np.stack([textured_scene(i, SIZE, SIZE) for i in range(count)])
    stamps = [FrameStamp(3000 * i, Fraction(1, 90000), None) for i in range(count)]
    encoder = encoder_class(1_000_000, convert_on_device=True)
    assert encoder.reads_device_memory  # the session then keeps the pipeline's output on its device
    downloading = encoder.prepare(torch.from_numpy(images), stamps)
    assert all(isinstance(frame, DownloadingFrame) for frame in downloading)
    for host, device in zip(encoder.prepare(images, stamps), map(as_video_frame, downloading), strict=True):
        assert host.format.name == device.format.name == encoder.pix_fmt and host.pts == device.pts
        assert np.abs(host.to_ndarray().astype(int) - device.to_ndarray().astype(int)).max() <= 1
    packets = [encoder.encode(frame, False) for frame in downloading]
    assert [p.pts for p in packets] == [s.pts for s in stamps] and encoder.is_keyframe(bytes(packets[0]))
    assert_shows(decode(DECODERS[encoder.name], packets)[-1], images[-1])


class FailsOnce(Vp8Encoder):
    """The real libvpx encoder with one planted fault: it raises on the fourth frame it is given."""

    given = 0

    def _encode(self, frame: Any, keyframe: bool) -> bytes | None:
        self.given += 1
        if self.given == 4:
            raise RuntimeError("planted encoder fault")
        return super()._encode(frame, keyframe)


async def test_a_frame_the_encoder_fails_on_is_dropped_and_the_video_goes_on_from_a_keyframe() -> None:
    """aiortc's sender ends the video for good when recv() raises: the track drops the frame instead, and reopens
    the encoder, so the next frame is a keyframe and everything sent decodes."""
    track = OutputTrack(capacity_frames=64)
    encoder = FailsOnce(1_000_000)
    track.use_encoder(encoder)
    count = 8
    images = np.stack([textured_scene(i, SIZE, SIZE) for i in range(count)])
    stamps = [FrameStamp(3000 * i, Fraction(1, 90000), None) for i in range(count)]
    await asyncio.to_thread(track.push_threadsafe, images, stamps)
    await asyncio.sleep(0)
    packets = [await asyncio.wait_for(track.recv(), 5) for _ in range(count - 1)]
    track.stop()
    assert [p.pts for p in packets] == [s.pts for i, s in enumerate(stamps) if i != 3]  # only the failed one lost
    assert [encoder.is_keyframe(bytes(p)) for p in packets] == [True, False, False, True, False, False, False]
    assert track.encode_errors == 1
    decoded = decode("vp8", packets)
    assert len(decoded) == count - 1
    assert_shows(decoded[-1], images[-1])


def test_stopping_an_encoder_waits_for_the_frame_it_is_encoding_and_encodes_no_more() -> None:
    """The track stops on the event loop while a pool thread may be inside `encode`: NVENC's session must not end
    under that frame, nor be reopened by a frame queued before the stop."""
    entered, release = threading.Event(), threading.Event()

    class Held(Vp8Encoder):
        def _encode(self, frame: Any, keyframe: bool) -> bytes | None:
            entered.set()
            assert release.wait(5)
            return super()._encode(frame, keyframe)

    encoder = Held(500_000)
    frames = encoder.prepare(np.stack([textured_scene(i, SIZE, SIZE) for i in range(2)]),
                             [FrameStamp(3000 * i, Fraction(1, 90000), None) for i in range(2)])  # fmt: skip
    encoding = threading.Thread(target=encoder.encode, args=(frames[0], True))
    encoding.start()
    assert entered.wait(5)
    stopping = threading.Thread(target=encoder.stop)
    stopping.start()
    stopping.join(0.2)
    assert stopping.is_alive()  # waits for the frame in the encoder
    release.set()
    encoding.join(5)
    stopping.join(5)
    assert not stopping.is_alive() and encoder._codec is None
    assert encoder.encode(frames[1], False) is None and encoder._codec is None  # not reopened


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device side of the CPU encoders' path needs CUDA")
@CPU_ENCODERS
def test_cpu_encoders_convert_gpu_frames_there_and_copy_only_yuv_without_a_host_sync(
    encoder_class: type[LibavEncoder],
) -> None:
    """On a GPU `prepare` (the pipeline worker's part) queues the conversion and a copy into pinned memory and
    returns: CUDA's sync debug mode raises on any host sync in it. The encode (the encoder thread's part) waits for
    the copy's event; the frames decode to the scene."""
    count = 6
    images = torch.from_numpy(np.stack([textured_scene(i, SIZE, SIZE) for i in range(count)])).cuda()
    stamps = [FrameStamp(3000 * i, Fraction(1, 90000), None) for i in range(count)]
    encoder = encoder_class(1_000_000, convert_on_device=True)
    encoder.prepare(images[:1], stamps[:1])  # the first call builds the Triton kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        frames = encoder.prepare(images, stamps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(f.host.is_pinned() and f.copied is not None for f in frames)  # type: ignore[union-attr]
    assert frames[0].host.numel() == SIZE * SIZE * 3 // 2  # type: ignore[union-attr]  # YUV 4:2:0, not RGB
    packets = [encoder.encode(frame, False) for frame in frames]
    assert_shows(decode(DECODERS[encoder.name], packets)[-1], images[-1].cpu().numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device side of the CPU encoders' path needs CUDA")
async def test_a_gpu_passthrough_sends_vp8_from_yuv_converted_on_the_device(tmp_path: Path) -> None:
    """Passthrough on GPU 0 and the seed's default codec (VP8): libvpx on the host, fed YUV converted on the GPU
    (`output_conversion` device:cuda); the frames come back in order with the input's content."""
    with run_server(tmp_path) as server:
        assert load_pipeline(server.url, "passthrough", height=SIZE, width=SIZE, gpus="0")["status"] == "loaded"
        client = ScopeClient(server.url, initial_parameters={"input_mode": "video"})
        await client.connect()
        try:
            frames = await client.wait_frames(45)
            video = httpx.get(f"{server.url}/api/v1/sessions/{client.session_id}/metrics").json()["video"]
            assert (video["encoder"], video["output_conversion"]) == ("libvpx", "device:cuda"), video
            counters = [f.counter for f in frames[5:]]
            assert counters == sorted(counters) and counters[-1] - counters[0] <= len(counters) + 3, counters
            assert client.track.sent - counters[-1] < 15
        finally:
            await client.close()


@pytest.fixture(scope="module")
def passthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """`--frame-path device`: input planes, and the output for our encoders, through kernels/colour.py even on this
    CPU, so the whole path runs (`DownloadingFrame` included)."""
    with run_server(tmp_path_factory.mktemp("server"), "--frame-path", "device") as server:
        status = load_pipeline(server.url, "passthrough", height=SIZE, width=SIZE)
        assert status["status"] == "loaded", status
        yield server


@pytest.mark.parametrize(
    ("offered", "codec", "encoder", "preset"),
    [
        (None, "video/VP8", "libvpx", "realtime"),  # aiortc's default offer, VP8 first, as a browser's: the default
        ("video/H264", "video/H264", "libx264", "ultrafast"),  # benchmarks/RESULTS.md: the cheapest, same PSNR
    ],
    ids=["vp8", "h264"],
)
async def test_packets_stream_to_an_aiortc_client_and_pli_gives_a_keyframe(
    passthrough: RunningServer, offered: str | None, codec: str, encoder: str, preset: str
) -> None:
    client = ScopeClient(passthrough.url, initial_parameters={"input_mode": "video"}, codec=offered)
    await client.connect()
    try:
        frames = await client.wait_frames(45)
        video = httpx.get(f"{passthrough.url}/api/v1/sessions/{client.session_id}/metrics").json()["video"]
        assert (video["codec"], video["encoder"], video["preset"]) == (codec, encoder, preset), video
        assert video["input_format"] == "yuv420p", video  # aiortc's software decoder's planes, read in place
        assert video["output_conversion"] == "device:cpu", video  # the output converted by the kernel, not swscale
        assert all((f.width, f.height) == (SIZE, SIZE) for f in frames)
        counters = [f.counter for f in frames[5:]]
        assert counters == sorted(counters), counters  # in order
        assert counters[-1] - counters[0] <= len(counters) + 3, counters  # and nearly all of them
        assert client.track.sent - counters[-1] < 15  # the content is the input's, recent

        # A PLI from the receiver: the next frame encoded is a keyframe (H.264: an IDR).
        before = len(client.frames)
        assert not any(f.key_frame for f in client.frames[before - 30 : before]), "keyframes without a request"
        receiver = client.pc.getReceivers()[0]
        ssrc = receiver.getSynchronizationSources()[0].source
        sent_at = time.monotonic()
        await receiver._send_rtcp_pli(ssrc)
        await client.wait_frames(before + 6)
        after = client.frames[before:]
        keyframe = next(i for i, f in enumerate(after) if f.key_frame)
        # The frame being encoded when the PLI lands is not one; the one after it is (one frame interval). Before
        # them come the frames already in this client's own receive path when the PLI left (its jitter buffer and
        # decoder queue): none on a quiet machine, two with six busy processes beside the test. Without the PLI the
        # next keyframe would be seconds away (KEYFRAME_INTERVAL_S, or a bitrate reopen).
        assert keyframe <= 3, [f.key_frame for f in after]
        assert after[keyframe].at - sent_at < 3 * FRAME_INTERVAL_S + 0.1, after[keyframe].at - sent_at
        metrics = httpx.get(f"{passthrough.url}/api/v1/sessions/{client.session_id}/metrics").json()["video"]
        assert metrics["keyframes_requested"] >= 1 and metrics["keyframes"] >= 2
        # aiortc's receiver sends REMB: its estimate replaced the start bitrate on our encoder.
        deadline = time.monotonic() + 5
        while metrics["bitrate_bps"] == 1_500_000:
            assert time.monotonic() < deadline, metrics
            await asyncio.sleep(0.2)
            metrics = httpx.get(f"{passthrough.url}/api/v1/sessions/{client.session_id}/metrics").json()["video"]
    finally:
        await client.close()


async def test_snapshot_and_recording_take_frames_converted_on_the_device(passthrough: RunningServer) -> None:
    """The output track holds our encoder's frames as they came from the device (`DownloadingFrame`); the snapshot
    and the recorder make host frames of them in their own threads, and both show the stream's content."""
    client = ScopeClient(passthrough.url, initial_parameters={"input_mode": "video"})
    session_id = await client.connect()
    async with httpx.AsyncClient(base_url=passthrough.url, timeout=10) as http:
        try:
            await client.wait_frames(10)
            video = (await http.get(f"/api/v1/sessions/{session_id}/metrics")).json()["video"]
            assert video["output_conversion"] == "device:cpu", video
            started = await http.post(f"/api/v1/recordings/{session_id}/start", json={})
            assert started.status_code == 200, started.text
            await client.wait_frames(len(client.frames) + 30)
            snapshot = await http.get(f"/api/v1/sessions/{session_id}/frame")
            assert snapshot.status_code == 200 and snapshot.headers["content-type"] == "image/jpeg"
            stopped = await http.post(f"/api/v1/recordings/{session_id}/stop", json={})
            assert stopped.status_code == 200 and stopped.json()["recording"]["state"] == "done", stopped.text
            recording = await http.get(f"/api/v1/recordings/{stopped.json()['recording']['id']}")
        finally:
            await client.close()
    received = {f.counter for f in client.frames}
    with av.open(io.BytesIO(snapshot.content)) as image:
        shown = next(image.decode(video=0)).to_ndarray(format="rgb24")
    assert shown.shape == (SIZE, SIZE, 3) and read_counter(shown) in received | {max(received) + i for i in range(20)}
    with av.open(io.BytesIO(recording.content), format="mp4") as container:
        recorded = [read_counter(frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    assert len(recorded) >= 20 and recorded == sorted(recorded) and set(recorded) <= received, recorded


def nvenc_or_skip() -> None:
    """Skips where this GPU has no NVENC that can serve a session (H100, H200 and A100 have none)."""
    from serve.webrtc.encoders import nvenc_unavailable

    pytest.importorskip("PyNvVideoCodec", reason="PyNvVideoCodec is not installed (pip install pynvvideocodec)")
    if (reason := nvenc_unavailable(torch.device("cuda"))) is not None:
        pytest.skip(f"NVENC unavailable: {reason}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVENC needs a CUDA GPU (and PyNvVideoCodec)")
def test_nvenc_encodes_device_frames_with_idr_on_request() -> None:
    """PyNvVideoCodec 2.2 returns each frame some frames after its input: a packet carries the timestamps of the
    frame it encodes, and the IDR asked for at frame 6 comes with frame 6's."""
    from serve.webrtc.encoders import NvencEncoder

    nvenc_or_skip()
    encoder = NvencEncoder(1_000_000, torch.device("cuda"))
    images = torch.from_numpy(np.stack([textured_scene(i, SIZE, SIZE) for i in range(10)])).cuda()
    stamps = [FrameStamp(3000 * i, Fraction(1, 90000), None) for i in range(10)]
    frames = encoder.prepare(images, stamps)
    packets = [p for i, frame in enumerate(frames) if (p := encoder.encode(frame, i == 6)) is not None]
    held = encoder.flush()
    pts = [p.pts for p in packets]
    assert pts == sorted(pts) and set(pts) <= {s.pts for s in stamps}, pts
    idr = {p.pts for p in packets if NAL_IDR in nal_types(bytes(p))}
    assert {0, 3000 * 6} <= idr | ({3000 * 6} if NAL_IDR in nal_types(held) else set()), (idr, pts)
    assert {NAL_SPS, NAL_PPS} <= set(nal_types(bytes(packets[0]))) and sps_profile(bytes(packets[0])) == H264_BASELINE
    decoded = decode("h264", [*packets, av.Packet(held)] if held else packets)
    assert len(decoded) == 10
    assert_shows(decoded[5], textured_scene(5, SIZE, SIZE))
    encoder.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NVDEC needs a CUDA GPU")
def test_nvdec_frames_stay_on_the_device_and_convert_like_software() -> None:
    from serve.pipelines.frames import YuvChunk, upload_yuv
    from serve.webrtc.nvdec import NvdecH264Decoder
    from serve.webrtc.planes import read_planes

    packets = encode_scene(X264Encoder(1_000_000), 6, set())
    hardware, software = NvdecH264Decoder(), av.CodecContext.create("h264", "r")
    for packet in packets:
        for on_gpu, on_cpu in zip(hardware.codec.decode(av.Packet(bytes(packet))),
                                  software.decode(av.Packet(bytes(packet))), strict=True):  # fmt: skip
            planes = read_planes(on_gpu)
            assert isinstance(planes.y, torch.Tensor) and planes.y.is_cuda
            torch.cuda.set_sync_debug_mode("error")  # a copy through the host (`cuda` taken for not `cuda:0`) raises
            try:
                device = upload_yuv(YuvChunk((planes,)), torch.device("cuda"), SIZE, SIZE)  # a load's device, no index
            finally:
                torch.cuda.set_sync_debug_mode("default")
            host = upload_yuv(YuvChunk((read_planes(on_cpu),)), torch.device("cpu"), SIZE, SIZE)
            assert (device.cpu() - host).abs().max() * 127.5 <= 2.0  # NVDEC and libavcodec decode alike


def test_passthrough_runs_where_its_load_says_and_refuses_a_gpu_that_is_not_there(passthrough: RunningServer) -> None:
    """`gpus` places passthrough like a model pipeline (the zero-copy path's benchmark loads it on GPU 0); a CPU rank
    is the CPU path, and a GPU this machine lacks is refused at the request (422) naming it, the loaded pipeline
    kept. The module's load is restored."""
    try:
        if not torch.cuda.is_available():
            response = httpx.post(f"{passthrough.url}/api/v1/pipeline/load", timeout=30,
                                  json={"pipeline_id": "passthrough", "load_params": {"gpus": "0"}})  # fmt: skip
            assert response.status_code == 422 and "gpus 0: no CUDA device is visible" in response.text, response.text
        status = load_pipeline(passthrough.url, "passthrough", height=SIZE, width=SIZE, gpus="cpu:1")
        assert status["status"] == "loaded" and status["load_params"]["gpus"] == "cpu:1", status
    finally:
        assert load_pipeline(passthrough.url, "passthrough", height=SIZE, width=SIZE)["status"] == "loaded"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the zero-copy path needs a CUDA GPU")
async def test_zero_copy_passthrough_decodes_with_nvdec_and_encodes_from_the_device(tmp_path: Path) -> None:
    """Passthrough on GPU 0 with `--nvdec`: the input is decoded into device memory, converted there and encoded by
    NVENC from there, or, on a GPU without NVENC (H100, H200), by libx264 from YUV converted there; the frames come
    back in order with the input's content."""
    from serve.webrtc.encoders import nvenc_unavailable

    expected = "nvenc" if nvenc_unavailable(torch.device("cuda", 0)) is None else "libx264"
    with run_server(tmp_path, "--nvdec") as server:
        assert load_pipeline(server.url, "passthrough", height=SIZE, width=SIZE, gpus="0")["status"] == "loaded"
        client = ScopeClient(server.url, initial_parameters={"input_mode": "video"}, codec="video/H264")
        await client.connect()
        try:
            frames = await client.wait_frames(45)
            video = httpx.get(f"{server.url}/api/v1/sessions/{client.session_id}/metrics").json()["video"]
            assert video["encoder"] == expected and video["input_format"] == "cuda", (video, server.log()[-2000:])
            counters = [f.counter for f in frames[5:]]
            assert counters == sorted(counters) and counters[-1] - counters[0] <= len(counters) + 3, counters
            assert client.track.sent - counters[-1] < 15
        finally:
            await client.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernels need a CUDA GPU")
def test_compiled_colour_kernels_equal_their_references_on_cuda() -> None:
    from kernels import triton_colour
    from kernels.colour import Colour, rgb_to_nv12, rgb_to_nv12_reference, yuv420_to_rgb, yuv420_to_rgb_reference

    assert triton_colour.unavailable_reason() is None
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 256, (481, 641), dtype=torch.uint8, generator=generator).cuda()
    uv = torch.randint(0, 256, (241, 642), dtype=torch.uint8, generator=generator).cuda()
    for colour in (Colour(), Colour("bt709", True)):
        out = torch.empty((3, 512, 512), device="cuda")
        yuv420_to_rgb(y, uv[:, 0::2], uv[:, 1::2], colour, out)
        reference = yuv420_to_rgb_reference(y, uv[:, 0::2], uv[:, 1::2], colour, 512, 512)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    rgb = torch.randint(0, 256, (480, 832, 3), dtype=torch.uint8, generator=generator).cuda()
    assert (rgb_to_nv12(rgb).int() - rgb_to_nv12_reference(rgb).int()).abs().max() <= 1


@pytest.mark.parametrize("frame_path", ["auto", "device"], ids=["swscale", "planes"])  # this CPU's two input paths
async def test_a_camera_that_changes_resolution_mid_stream_keeps_streaming_at_the_loaded_size(
    tmp_path: Path, frame_path: str
) -> None:
    """Browsers scale a camera's resolution down (and back up) under CPU or bandwidth limits, so the decoded input
    changes size mid-stream: the output keeps the loaded size and goes on showing the input's content. Chunks of 4
    frames, so a chunk can hold frames of both sizes."""
    with run_server(tmp_path, "--frame-path", frame_path) as server:
        assert load_pipeline(server.url, "passthrough", height=SIZE, width=SIZE, chunk_size=4)["status"] == "loaded"
        client = ScopeClient(server.url, initial_parameters={"input_mode": "video"})
        await client.connect()
        try:
            assert client.track is not None
            for height, width in ((240, 320), (120, 160), (360, 480)):
                client.track.height, client.track.width = height, width  # the next frames are drawn at this size
                switched_at = client.track.sent
                await client.wait_frames(len(client.frames) + 30)
                recent = [f.counter for f in client.frames[-15:]]
                assert recent == sorted(recent) and min(recent) >= switched_at, (height, width, switched_at, recent)
            assert {(f.width, f.height) for f in client.frames} == {(SIZE, SIZE)}
        finally:
            await client.close()
        assert "Traceback" not in server.log(), server.log()[-3000:]


async def test_host_frame_path_keeps_aiortcs_own_encoders(tmp_path: Path) -> None:
    """`--frame-path host` (the old path, the benchmark's baseline): VP8 (offered first) and H.264 (asked for) are
    encoded by aiortc from frames."""
    with run_server(tmp_path, "--frame-path", "host") as server:
        assert load_pipeline(server.url, "passthrough", height=SIZE, width=SIZE)["status"] == "loaded"
        for offered, codec in ((None, "video/VP8"), ("video/H264", "video/H264")):
            client = ScopeClient(server.url, initial_parameters={"input_mode": "video"}, codec=offered)
            await client.connect()
            try:
                frames = await client.wait_frames(10)
                video = httpx.get(f"{server.url}/api/v1/sessions/{client.session_id}/metrics").json()["video"]
                assert video["codec"] == codec and video["encoder"] == "aiortc", video
                assert video["output_conversion"] == "aiortc", video
                assert (frames[-1].width, frames[-1].height) == (SIZE, SIZE)
            finally:
                await client.close()


def answered_codecs(sdp: str) -> list[str]:
    """The video m-line's codecs in the answer's order (its first is the one both peers send)."""
    lines = sdp.splitlines()
    payload_types = next(line for line in lines if line.startswith("m=video")).split()[3:]
    names = dict(line[len("a=rtpmap:") :].split(" ", 1) for line in lines if line.startswith("a=rtpmap:"))
    return [names[pt].split("/")[0] for pt in payload_types]


async def test_a_server_preferring_h264_answers_it_to_a_vp8_first_offer_and_vp8_to_a_vp8_only_one(
    tmp_path: Path,
) -> None:
    """`--codec-preference h264`: aiortc's default offer (VP8 first, H.264 after it, as a browser's) is answered with
    H.264 first, so both directions run H.264; an offer without H.264 still gets VP8."""
    with run_server(tmp_path, "--codec-preference", "h264") as server:
        assert load_pipeline(server.url, "passthrough", height=SIZE, width=SIZE)["status"] == "loaded"
        for offered, codec, encoder in ((None, "video/H264", "libx264"), ("video/VP8", "video/VP8", "libvpx")):
            client = ScopeClient(server.url, initial_parameters={"input_mode": "video"}, codec=offered)
            await client.connect()
            try:
                frames = await client.wait_frames(15)
                video = httpx.get(f"{server.url}/api/v1/sessions/{client.session_id}/metrics").json()["video"]
                assert (video["codec"], video["encoder"]) == (codec, encoder), video
                assert video["output_conversion"] == "swscale", video  # a CPU pipeline, the default frame path
                assert answered_codecs(client.pc.remoteDescription.sdp)[0] == codec[len("video/") :]
                counters = [f.counter for f in frames[5:]]
                assert counters == sorted(counters) and client.track.sent - counters[-1] < 15, counters
            finally:
                await client.close()


def server_threads(pid: int) -> list[str]:
    """The OS names of a process's threads (serve/threads.py names ours)."""
    return [(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()]


@pytest.mark.skipif(sys.platform != "linux", reason="thread names are read from /proc")
async def test_the_chosen_x264_preset_is_used_and_the_decoder_runs_on_one_named_thread(tmp_path: Path) -> None:
    """`--x264-preset` reaches the encoder (metrics and log say which); the session's input decoder is one thread,
    named, without FFmpeg's helpers (aiortc's own opens 3 on 2 cores); our encoder and the worker carry names too."""
    with run_server(tmp_path, "--x264-preset", "superfast") as server:
        assert load_pipeline(server.url, "passthrough", height=SIZE, width=SIZE)["status"] == "loaded"
        client = ScopeClient(server.url, initial_parameters={"input_mode": "video"}, codec="video/H264")
        await client.connect()
        try:
            await client.wait_frames(15)
            video = httpx.get(f"{server.url}/api/v1/sessions/{client.session_id}/metrics").json()["video"]
            assert video["encoder"] == "libx264" and video["preset"] == "superfast", video
            assert "h264 encoder=libx264 preset=superfast" in server.log()
            names = server_threads(server.process.pid)
            assert names.count(DECODER) == 1, names
            assert names.count(PIPELINE_WORKER) == 1 and ENCODER in names, names
        finally:
            await client.close()
