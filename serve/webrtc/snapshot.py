"""A session's newest output frame as a JPEG (GET /api/v1/sessions/{id}/frame, Scope's /session/frame)."""

from __future__ import annotations

from fractions import Fraction

import av
from av import VideoFrame
from av.video.reformatter import VideoReformatter

# FFmpeg's MJPEG quantizer scale: 2 is the finest, 31 the coarsest.
QSCALE_BEST, QSCALE_WORST = 2, 31


def encode_jpeg(frame: VideoFrame, quality: int) -> bytes:
    """`quality` 1-100 as image tools spell it, mapped onto the quantizer scale. CPU work: run it off the event loop."""
    qscale = round(QSCALE_WORST - (quality - 1) * (QSCALE_WORST - QSCALE_BEST) / 99)
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height = frame.width & ~1 or 2, frame.height & ~1 or 2
    codec.pix_fmt = "yuvj420p"
    codec.time_base = Fraction(1, 1)
    codec.options = {"qmin": str(qscale), "qmax": str(qscale)}
    # A converter of its own: the frame's cached one may be in use by the WebRTC encoder's thread right now.
    image = VideoReformatter().reformat(frame, width=codec.width, height=codec.height, format="yuvj420p")
    image.pts = 0
    packets = codec.encode(image) + codec.encode(None)
    return b"".join(bytes(packet) for packet in packets)
