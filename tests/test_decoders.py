"""aiortc's input decoders routed to ours (serve/webrtc/decoders.py): one thread each, named for the OS, decoding
exactly as aiortc's own do."""

from __future__ import annotations

import fractions
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import aiortc.rtcrtpreceiver
import av
import numpy as np
import pytest
from aiortc.codecs.base import Decoder
from aiortc.codecs.h264 import H264Decoder
from aiortc.codecs.vpx import Vp8Decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from serve.threads import DECODER
from serve.webrtc.decoders import SingleThreadH264Decoder, SingleThreadVp8Decoder, install_decoders
from tests.support.scenes import textured_scene

SIZE = 256
FRAMES = 6


def encoded_scene(codec: str) -> list[JitterFrame]:
    encoder = av.CodecContext.create(codec, "w")
    encoder.width = encoder.height = SIZE
    encoder.pix_fmt, encoder.time_base, encoder.bit_rate = "yuv420p", fractions.Fraction(1, 30), 1_000_000
    encoder.options = {"tune": "zerolatency"} if codec == "libx264" else {"deadline": "realtime", "lag-in-frames": "0"}
    out = []
    for index in range(FRAMES):
        frame = av.VideoFrame.from_ndarray(textured_scene(index, SIZE, SIZE), format="rgb24").reformat(format="yuv420p")
        frame.pts = index
        out.append(JitterFrame(b"".join(bytes(p) for p in encoder.encode(frame)), 3000 * index))
    return out


def thread_names() -> list[str]:
    return [open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task")]


def on_new_thread(body: Callable[[], Any]) -> Any:
    """Run `body` on a thread of its own (as aiortc runs a receiver's decoder) and return what it returned."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(body()))
    thread.start()
    thread.join()
    return result[0]


@pytest.mark.parametrize(
    ("codec", "ours", "aiortcs"),
    [("libx264", SingleThreadH264Decoder, H264Decoder), ("libvpx", SingleThreadVp8Decoder, Vp8Decoder)],
)
def test_our_decoders_use_one_thread_and_decode_as_aiortcs_do(codec: str, ours: type, aiortcs: type) -> None:
    packets = encoded_scene(codec)
    mine, theirs = ours(), aiortcs()
    for packet in packets:
        got, want = mine.decode(packet), theirs.decode(packet)
        assert len(got) == len(want) == 1
        assert np.array_equal(got[0].to_ndarray(), want[0].to_ndarray())  # bit-exact: threads change no pixel
    assert mine.codec.is_open and mine.codec.thread_count == 1
    assert theirs.codec.thread_count != 1  # PyAV's default, 0 = one per core: what ours changes


@pytest.fixture
def routed() -> Iterator[Callable[..., Decoder]]:
    original = aiortc.rtcrtpreceiver.get_decoder
    install_decoders(nvdec=False)
    yield aiortc.rtcrtpreceiver.get_decoder
    aiortc.rtcrtpreceiver.get_decoder = original  # type: ignore[assignment]


def test_aiortc_opens_ours_on_a_thread_named_for_the_os_with_no_helpers(routed: Callable[..., Decoder]) -> None:
    h264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102)
    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    assert isinstance(on_new_thread(lambda: routed(vp8)), SingleThreadVp8Decoder)
    packets = encoded_scene("libx264")

    def decode_and_count() -> tuple[Decoder, int]:
        decoder = routed(h264)  # as aiortc's decoder_worker calls it, on the receiver's decoder thread
        for packet in packets:
            decoder.decode(packet)
        return decoder, thread_names().count(DECODER)  # FFmpeg's own threads would inherit the name

    decoder, named = on_new_thread(decode_and_count)
    assert isinstance(decoder, SingleThreadH264Decoder)
    assert named == 1  # the decoder thread alone: aiortc's default opened 3 here (2 cores)
