"""Software video codec settings for aiortc's encoders.

aiortc caps VP8 at 1.5 Mb/s and starts it at 0.5 Mb/s, which smears generated 512×512 video; the receiver's REMB
estimate still steers the bitrate inside these bounds. Like ICE, these are module attributes, set once per process.
"""

from __future__ import annotations

from aiortc.codecs import h264, vpx

from serve.settings import WebRTCSettings


def configure_codecs(settings: WebRTCSettings) -> None:
    for codec in (vpx, h264):
        codec.MAX_BITRATE = settings.max_bitrate_kbps * 1000
        codec.DEFAULT_BITRATE = min(settings.start_bitrate_kbps * 1000, codec.MAX_BITRATE)
        codec.MIN_BITRATE = min(codec.MIN_BITRATE, codec.DEFAULT_BITRATE)
