"""NVDEC for incoming H.264 (`--nvdec`): the decoded frame stays in device memory and never exists on the host.

aiortc picks its decoder with a plain function (`get_decoder`, imported by name into aiortc.rtcrtpreceiver), so the
H.264 case is replaced there, once per process. The decoder is PyAV's own with the CUDA hwaccel
(`is_hw_owned=True`: frames are CUDA frames, sw_format nv12); serve/webrtc/planes.py reads their two planes through
DLPack as torch CUDA tensors, and serve/pipelines/frames.py then skips the host→device copy.

Written against PyAV 18's documented hwaccel/DLPack API (reference/trt.md §5); exercised only by the gpu-marked test
in tests/test_packet_path.py. Without a GPU `install_nvdec` says why in one line and leaves aiortc's decoder.
"""

from __future__ import annotations

import logging
from typing import Any

import aiortc.rtcrtpreceiver
import av
from aiortc.codecs import get_decoder
from aiortc.codecs.base import Decoder
from aiortc.mediastreams import VIDEO_TIME_BASE

log = logging.getLogger(__name__)


class NvdecH264Decoder(Decoder):
    def __init__(self) -> None:
        from av.codec.hwaccel import HWAccel

        self.codec = av.CodecContext.create(
            "h264", "r", hwaccel=HWAccel("cuda", allow_software_fallback=False, is_hw_owned=True)
        )

    def decode(self, encoded_frame: Any) -> list[Any]:
        packet = av.Packet(encoded_frame.data)  # one access unit, Annex B, as aiortc's depayloader assembles it
        packet.pts = encoded_frame.timestamp
        packet.time_base = VIDEO_TIME_BASE
        return list(self.codec.decode(packet))


def install_nvdec() -> bool:
    """Route aiortc's H.264 decoding to NVDEC; False (and one log line why) where it cannot open."""
    try:
        NvdecH264Decoder()
    except Exception as exc:  # no CUDA device, no libnvcuvid, a PyAV without hwaccel
        log.warning("--nvdec: NVDEC unavailable (%s: %s); aiortc's software decoder stays", type(exc).__name__, exc)
        return False

    def decoder_for(codec: Any) -> Decoder:
        if codec.mimeType.lower() == "video/h264":
            return NvdecH264Decoder()
        return get_decoder(codec)

    aiortc.rtcrtpreceiver.get_decoder = decoder_for  # type: ignore[assignment]
    log.info("h264 decoder=nvdec")
    return True
