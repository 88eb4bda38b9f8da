"""NVDEC for incoming H.264 (`--nvdec`): the decoded frame stays in device memory and never exists on the host.

serve/webrtc/decoders.py routes aiortc's H.264 decoding here when `nvdec_opens`. The decoder is PyAV's own with the
CUDA hwaccel (`is_hw_owned=True`: frames are CUDA frames, sw_format nv12); serve/webrtc/planes.py reads their two
planes through DLPack as torch CUDA tensors, and serve/pipelines/frames.py then skips the host→device copy.

Written against PyAV 18's documented hwaccel/DLPack API (reference/trt.md §5); exercised only by the gpu-marked test
in tests/test_packet_path.py. Without a GPU `nvdec_opens` says why in one line and aiortc's decoder stays.
"""

from __future__ import annotations

import logging
from typing import Any

import av
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


def nvdec_opens() -> bool:
    """Whether an NVDEC decoder opens here; False (and one log line why) where it cannot."""
    try:
        NvdecH264Decoder()
    except Exception as exc:  # no CUDA device, no libnvcuvid, a PyAV without hwaccel
        log.warning("--nvdec: NVDEC unavailable (%s: %s); the software decoder stays", type(exc).__name__, exc)
        return False
    log.info("h264 decoder=nvdec")
    return True
