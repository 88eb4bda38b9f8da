"""A Python WebRTC client doing what the seed's JavaScript does: offer with a `parameters` data channel, trickle
its candidates with PATCH, receive the output track, send updates, close (or vanish without a word)."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
import aiortc.rtcrtpreceiver
import av
import httpx
import numpy as np
from aiortc import (
    AudioStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.codecs import get_decoder
from aiortc.codecs.base import Decoder
from aiortc.codecs.vpx import Vp8Decoder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame

from tests.support.frames import draw_counter, read_counter

# aioice leaves 127.0.0.1 out of host candidates; the tests run everything over loopback.
aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []


class KeyframeMarkingVp8Decoder(Vp8Decoder):
    """FFmpeg's own VP8 decoder where aiortc opens libvpx's: it marks key frames (libvpx's wrapper leaves every frame
    unmarked), which the tests check after a PLI; the pictures are the same bit for bit."""

    def __init__(self) -> None:
        self.codec = av.CodecContext.create("vp8", "r")


def client_decoder(codec: Any) -> Decoder:
    return KeyframeMarkingVp8Decoder() if codec.mimeType.lower() == "video/vp8" else get_decoder(codec)


# The clients' receivers decode with it (aiortc looks the decoder up by this name; the servers are other processes).
aiortc.rtcrtpreceiver.get_decoder = client_decoder  # type: ignore[assignment]


class CounterTrack(VideoStreamTrack):
    """30 fps camera stand-in whose frame i shows the number i in bars (tests/support/frames.py)."""

    def __init__(self, height: int = 240, width: int = 320) -> None:
        super().__init__()
        self.height, self.width = height, width
        self.sent = 0

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(draw_counter(self.sent, self.height, self.width), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame


class StillTrack(VideoStreamTrack):
    """30 fps camera stand-in that shows the same image in every frame: an input two sessions can share exactly.

    Every frame is the same VP8 keyframe, encoded once (aiortc packetizes an `av.Packet` as it is), so each frame
    decodes to the same picture on its own. Encoding frame by frame would not do: aiortc re-creates its encoder (a
    new keyframe) whenever the receiver's bandwidth estimate moves its target by over 10 %, which under load happens
    at different frames in different sessions, and the decoded still differs by a few levels from there on.
    """

    def __init__(self, image: np.ndarray) -> None:
        super().__init__()
        self.keyframe = vp8_keyframe(np.ascontiguousarray(image))  # [H, W, 3] uint8

    async def recv(self) -> av.Packet:
        pts, time_base = await self.next_timestamp()
        packet = av.Packet(self.keyframe)
        packet.pts, packet.time_base = pts, time_base
        return packet


def vp8_keyframe(image: np.ndarray) -> bytes:
    """`image` [H, W, 3] uint8 as one VP8 keyframe, at a rate that leaves a small still nearly untouched."""
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "yuv420p"
    codec.time_base, codec.bit_rate = fractions.Fraction(1, 30), 2_000_000
    codec.qmin, codec.qmax = 2, 10
    frame = VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
    frame.pts = 0
    packets = [*codec.encode(frame), *codec.encode(None)]
    assert len(packets) == 1 and packets[0].is_keyframe, "one frame in, one keyframe out"
    return bytes(packets[0])


@dataclass
class Received:
    counter: int
    width: int
    height: int
    at: float
    pixels: np.ndarray | None = None
    key_frame: bool = False


@dataclass
class ScopeClient:
    url: str
    send_video: bool = True
    initial_parameters: dict[str, Any] | None = None
    keep_pixels: bool = False
    session_id: str | None = None
    frames: list[Received] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    track: CounterTrack | None = None
    input_track: MediaStreamTrack | None = None  # sent instead of a CounterTrack (e.g. a still image: same input)
    codec: str | None = None  # e.g. "video/H264": offered alone (with its RTX), as setCodecPreferences does
    read_index: Callable[[np.ndarray], int] = read_counter  # a received frame's index, from its pixels
    # False: the offer leaves out abs-send-time, so neither receiver estimates bandwidth (no REMB) and each encoder
    # keeps its start bitrate. aiortc's VP8 encoder starts afresh, with a keyframe, whenever REMB moves its target
    # by over 10 %, at frames that differ from session to session under load; sessions compared pixel for pixel
    # need the lossy coding of their frames to be the same.
    estimate_bandwidth: bool = True
    send_audio: bool = False  # a microphone track too, as getUserMedia({audio: true, video: true}) gives
    answer_sdp: str = ""

    async def connect(self) -> str:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            ice = (await http.get("/api/v1/webrtc/ice-servers")).json()["iceServers"]
            assert ice == [], "the server must not hand out public STUN servers by default"
            self.pc = pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            self.channel = pc.createDataChannel("parameters", ordered=True)
            self.channel_open = asyncio.Event()
            self.channel.on("open", self.channel_open.set)
            self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
            if self.input_track is not None:
                if isinstance(self.input_track, StillTrack) and self.codec not in (None, "video/VP8"):
                    raise ValueError("a StillTrack sends VP8 keyframes: offer VP8 with it")
                pc.addTrack(self.input_track)
            elif self.send_video:
                self.track = CounterTrack()
                pc.addTrack(self.track)
            else:
                pc.addTransceiver("video", direction="recvonly")
            if self.send_audio:
                pc.addTrack(AudioStreamTrack())
            if self.codec is not None:
                capabilities = RTCRtpSender.getCapabilities("video").codecs
                preferred = [c for c in capabilities if c.mimeType in (self.codec, "video/rtx")]
                for transceiver in pc.getTransceivers():
                    if transceiver.kind == "video":
                        transceiver.setCodecPreferences(preferred)
            pc.on("track", lambda track: asyncio.ensure_future(self._receive(track)))
            await pc.setLocalDescription(await pc.createOffer())
            sdp = (
                pc.localDescription.sdp
                if self.estimate_bandwidth
                else without_bandwidth_estimation(pc.localDescription.sdp)
            )
            body: dict[str, Any] = {"sdp": sdp, "type": pc.localDescription.type}
            if self.initial_parameters is not None:
                body["initialParameters"] = self.initial_parameters
            response = await http.post("/api/v1/webrtc/offer", json=body)
            assert response.status_code == 200, f"{response.status_code} {response.text}"
            answer = response.json()
            self.answer_sdp = answer["sdp"]
            if not self.estimate_bandwidth:
                assert "abs-send-time" not in answer["sdp"], "the answer has abs-send-time that the offer left out"
            self.session_id = answer["sessionId"]
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            # Trickle our candidates as a browser would (aiortc also put them in the offer).
            candidates = [
                {"candidate": line[2:], "sdpMid": "0", "sdpMLineIndex": 0}
                for line in pc.localDescription.sdp.splitlines()
                if line.startswith("a=candidate:")
            ] + [{"candidate": "", "sdpMid": "0", "sdpMLineIndex": 0}]
            response = await http.patch(f"/api/v1/webrtc/offer/{self.session_id}", json={"candidates": candidates})
            assert response.status_code == 204, response.text
        return self.session_id

    async def _receive(self, track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            rgb = frame.to_ndarray(format="rgb24")
            self.frames.append(
                Received(
                    self.read_index(rgb), frame.width, frame.height, time.monotonic(),
                    rgb if self.keep_pixels else None, frame.key_frame,
                )
            )  # fmt: skip

    async def wait_frames(self, count: int, timeout_s: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while len(self.frames) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"received {len(self.frames)} of {count} frames in {timeout_s} s")
            await asyncio.sleep(0.02)
        return self.frames

    async def wait_message(self, type_: str, timeout_s: float = 10.0, start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in self.messages[start:]:
                if message.get("type") == type_:
                    return message
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {type_!r} message in {timeout_s} s; got {self.messages}")

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await asyncio.wait_for(self.channel_open.wait(), 10)
        self.channel.send(message if isinstance(message, str | bytes) else json.dumps(message))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.close()
        await self.pc.close()

    async def vanish(self) -> None:
        """The network goes away: our sockets close and nothing (no DTLS close, no RTCP BYE) reaches the server."""
        for transceiver in self.pc.getTransceivers():
            connection = transceiver.receiver.transport.transport._connection
            await connection.close()
        if self.track is not None:
            self.track.stop()


def without_bandwidth_estimation(sdp: str) -> str:
    """`sdp` without the abs-send-time extension and goog-remb feedback: the answer then has neither, so neither
    side's receiver estimates bandwidth (aiortc's estimator reads abs-send-time) and no REMB is sent."""
    lines = sdp.split("\r\n")
    return "\r\n".join(line for line in lines if "abs-send-time" not in line and "goog-remb" not in line)


async def offer_sdp(video_sections: int = 1, candidates: bool = True) -> str:
    """A real aiortc offer (video + the `parameters` data channel) whose peer is closed at once: it will never connect.

    Without `candidates` its candidate lines are removed, as a browser's are before it trickles them."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.createDataChannel("parameters")
    for _ in range(video_sections):
        pc.addTransceiver("video", direction="sendrecv")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    if not candidates:
        sdp = "".join(
            line for line in sdp.splitlines(keepends=True) if not line.startswith(("a=candidate:", "a=end-of-cand"))
        )
    return sdp
