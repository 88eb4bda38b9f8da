"""Codec plumbing: aiortc's bitrate bounds, and the packet path's hooks on its sender.

aiortc caps VP8 at 1.5 Mb/s and starts it at 0.5 Mb/s, which smears generated 512×512 video; the receiver's REMB
estimate still steers the bitrate inside these bounds. Like ICE, these are module attributes, set once per process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpTransceiver
from aiortc.codecs import h264, is_rtx, vpx

from serve.settings import WebRTCSettings


def configure_codecs(settings: WebRTCSettings) -> None:
    for codec in (vpx, h264):
        codec.MAX_BITRATE = settings.max_bitrate_kbps * 1000
        codec.DEFAULT_BITRATE = min(settings.start_bitrate_kbps * 1000, codec.MAX_BITRATE)
        codec.MIN_BITRATE = min(codec.MIN_BITRATE, codec.DEFAULT_BITRATE)


def sending_codec(transceiver: RTCRtpTransceiver) -> str | None:
    """The mimeType the sender will use once negotiated: the first common codec, in the offer's order (aiortc answers
    in the remote's order, so a browser's VP8-first offer gets VP8, and `setCodecPreferences` with H.264 first gets
    H.264)."""
    codecs = [c for c in transceiver._codecs if not is_rtx(c)]
    return codecs[0].mimeType if codecs else None


def prefer_codec(transceiver: RTCRtpTransceiver, mime_type: str) -> None:
    """List `mime_type` (each of its entries, each with its RTX) first in the answer, where the offer has it.

    The answer's first codec is the one both peers send (JSEP), so a browser that offered VP8 first sends and receives
    `mime_type`. aiortc builds the answer's list inside setRemoteDescription, in the offer's order (setCodecPreferences
    only applies while it builds it, before the transceiver exists here), so that list (aiortc 1.16's `_codecs`) is
    reordered; tests/test_packet_path.py and tests/test_browser_codecs.py check the result."""
    codecs = transceiver._codecs
    chosen = [c for c in codecs if c.mimeType.lower() == mime_type.lower()]
    first = []
    for codec in chosen:
        first.append(codec)
        first += [c for c in codecs if is_rtx(c) and c.parameters.get("apt") == codec.payloadType]
    transceiver._codecs = first + [c for c in codecs if c not in first]


def hook_sender(transceiver: RTCRtpTransceiver, request_keyframe: Callable[[], None]) -> Callable[[], int | None]:
    """Route the sender's PLI/FIR to `request_keyframe`, and return a reader of its receiver bitrate estimate.

    With pre-encoded packets aiortc's PLI/FIR handling only sets a private flag its pack path ignores, and REMB
    sets `target_bitrate` on its own encoder, which then only packetizes; both are read through aiortc 1.16's
    internals here, and tests/test_packet_path.py checks that they still work."""
    sender = transceiver.sender
    sender._send_keyframe = request_keyframe  # type: ignore[method-assign]  # the method RTCP PLI and FIR call

    def bitrate() -> int | None:
        unused: Any = getattr(sender, "_RTCRtpSender__encoder", None)  # created at the first packet
        return getattr(unused, "target_bitrate", None)

    return bitrate
