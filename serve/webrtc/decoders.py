"""Which decoder aiortc opens for each incoming video stream: single-threaded software ones, or NVDEC for H.264.

aiortc picks a receiver's decoder with a plain function (`get_decoder`, imported by name into aiortc.rtcrtpreceiver)
that it calls on the receiver's own decoder thread; `install_decoders` replaces it there, once per process. Its VP8
and H.264 decoders leave PyAV's default thread count, 0 (one slice thread per core), so each stream kept a helper
thread that was woken for every frame; a 512² frame is one slice and decodes in about a millisecond on one thread,
and many streams share two cores better one thread each (benchmarks/RESULTS.md, issue 13). The subclasses set one
thread before the codec opens (PyAV opens it at the first decode), so nothing of aiortc's is patched but the lookup.
The router also names the decoder thread for the OS (serve/threads.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiortc.rtcrtpreceiver
from aiortc.codecs import get_decoder
from aiortc.codecs.base import Decoder
from aiortc.codecs.h264 import H264Decoder
from aiortc.codecs.vpx import Vp8Decoder

from serve.threads import DECODER, name_os_thread

log = logging.getLogger(__name__)

DECODER_THREADS = 1


class SingleThreadH264Decoder(H264Decoder):
    def __init__(self) -> None:
        super().__init__()
        self.codec.thread_count = DECODER_THREADS


class SingleThreadVp8Decoder(Vp8Decoder):
    def __init__(self) -> None:
        super().__init__()
        self.codec.thread_count = DECODER_THREADS


def install_decoders(nvdec: bool) -> None:
    """Route aiortc's video decoders to ours; with `nvdec`, H.264 to NVDEC where it opens (else one log line why)."""
    h264: Callable[[], Decoder] = SingleThreadH264Decoder
    if nvdec:
        from serve.webrtc.nvdec import NvdecH264Decoder, nvdec_opens

        if nvdec_opens():
            h264 = NvdecH264Decoder

    def decoder_for(codec: Any) -> Decoder:
        name_os_thread(DECODER)  # aiortc calls this on the receiver's decoder thread
        mime = codec.mimeType.lower()
        if mime == "video/h264":
            return h264()
        if mime == "video/vp8":
            return SingleThreadVp8Decoder()
        return get_decoder(codec)

    aiortc.rtcrtpreceiver.get_decoder = decoder_for  # type: ignore[assignment]
