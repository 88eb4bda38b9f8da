"""An offer's SDP text, checked before aiortc parses it: what aiortc would take and then fail on in the background
(a connect task that raises, a DTLS start that cannot succeed, sends it refuses), or that costs the event loop more
to parse than a browser's offer ever needs. Each refusal is a 400 saying what to send instead.
"""

from __future__ import annotations

import itertools
import re

from aiortc.rtcdtlstransport import X509_DIGEST_ALGORITHMS

from serve.assets import echo
from serve.errors import InvalidRequest

# An offer is checked against these before aiortc parses it: parsing and answering cost the event loop about 2 ms
# per media section and 0.5 ms per candidate line, and a browser's offer has 1 to 3 sections and a few candidates.
MAX_SDP_MEDIA_SECTIONS = 4
MAX_SDP_CANDIDATES = 32
MEDIA_KINDS = ("audio", "video", "application")  # what aiortc negotiates; another kind breaks its connect task
MID_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")  # RFC 5888's identification-tag is an RFC 4566 token
# The least a peer may take per data-channel message: a stats message is ~600 bytes, an error echoes up to ~1 KB of
# the client's input. Browsers take 256 KiB; RFC 8841's 0 means no limit.
MIN_PEER_MESSAGE_BYTES = 16 * 1024


def check_offer_sdp(sdp: str) -> list[str]:
    """The mids of the offer's media sections, in order; raises InvalidRequest for an offer too big to parse, or
    one whose media sections aiortc would answer and then fail on."""
    if not sdp.lstrip().startswith("v=0"):
        raise InvalidRequest("malformed SDP offer: an SDP starts with 'v=0'; send pc.localDescription.sdp")
    lines = sdp.splitlines()
    sections = [i for i, line in enumerate(lines) if line.startswith("m=")]
    if len(sections) > MAX_SDP_MEDIA_SECTIONS:
        raise InvalidRequest(
            f"the offer has {len(sections)} media sections; this server takes at most {MAX_SDP_MEDIA_SECTIONS} "
            "(one video track and the 'parameters' data channel is all a stream needs)"
        )
    candidates = sum(line.startswith("a=candidate:") for line in lines)
    if candidates > MAX_SDP_CANDIDATES:
        raise InvalidRequest(
            f"the offer lists {candidates} ICE candidates; this server takes at most {MAX_SDP_CANDIDATES} in an "
            "offer (trickle the rest with PATCH /api/v1/webrtc/offer/{sessionId})"
        )
    kinds = [lines[i][2:].split(" ", 1)[0] for i in sections]
    if other := [kind for kind in kinds if kind not in MEDIA_KINDS]:
        raise InvalidRequest(f"the offer has a media section of kind {echo(other[0])}; only audio, video and "
                             "application (the data channel) are negotiated")  # fmt: skip
    if "video" not in kinds:
        raise InvalidRequest(
            "the offer has no video m-line: add the camera track (video mode) or "
            "pc.addTransceiver('video') (text mode) before createOffer()"
        )
    mids = []
    for start, end in itertools.pairwise([*sections, len(lines)]):
        mid = next((line[6:].strip() for line in lines[start:end] if line.startswith("a=mid:")), None)
        if mid is not None and not MID_TOKEN.fullmatch(mid):
            raise InvalidRequest(f"the offer's mid {echo(mid)} is not a token (letters, digits, !#$%&'*+-.^_`{{|}}~)")
        mids.append(mid if mid is not None else str(len(mids)))
    if len(set(mids)) != len(mids):  # aiortc answers it (BUNDLE "0 0"), and no peer can connect to that answer
        raise InvalidRequest(f"the offer's media sections share a mid ({', '.join(mids)}); each needs its own")
    bundle = next((line.split()[1:] for line in lines if line.startswith("a=group:BUNDLE")), None)
    if bundle is not None and (outside := [mid for mid in mids if mid not in bundle]):
        raise InvalidRequest(
            f"the offer's mid {echo(outside[0])} is not in its BUNDLE group ({echo(' '.join(bundle))}); send the "
            "browser's pc.localDescription.sdp unchanged"
        )
    check_peer_message_size(lines)
    return mids


def offers_video_input(sdp: str) -> bool:
    """Whether the offer sends video: a video section that is sendrecv or sendonly (the default, RFC 4566)."""
    for section in sdp.split("\nm=")[1:]:
        if section.startswith("video"):
            lines = [line.strip() for line in section.splitlines()]
            if not any(line in ("a=recvonly", "a=inactive") for line in lines):
                return True
    return False


def check_peer_message_size(lines: list[str]) -> None:
    """A peer that takes only tiny data-channel messages could be sent no stats and no error (aiortc raises on a
    bigger send): refused, unless 0 (no limit)."""
    prefix = "a=max-message-size:"
    for line in lines:
        if line.startswith(prefix):
            value = line[len(prefix) :].strip()
            if not value.isdigit() or 0 < int(value) < MIN_PEER_MESSAGE_BYTES:
                raise InvalidRequest(
                    f"the offer's a=max-message-size ({echo(value)}) is below the {MIN_PEER_MESSAGE_BYTES} bytes this "
                    "server's messages need (0 means no limit; browsers offer 262144)"
                )


FINGERPRINT_VALUE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2})+")


def check_fingerprints(sdp: str) -> None:
    """aiortc takes an offer without a usable fingerprint, answers it, and fails DTLS in the background: the client
    waits for a connection that cannot come, and its seat is held until the connect timeout."""
    prefix = "a=fingerprint:"
    fingerprints = [line[len(prefix) :].split() for line in sdp.splitlines() if line.startswith(prefix)]
    if not fingerprints:
        raise InvalidRequest(
            "the offer has no a=fingerprint line (DTLS checks the peer's certificate against it); send the "
            "browser's pc.localDescription.sdp unchanged"
        )
    usable = [f for f in fingerprints if len(f) == 2 and f[0].lower() in X509_DIGEST_ALGORITHMS]
    if not usable or not all(FINGERPRINT_VALUE.fullmatch(value) for _, value in usable):
        raise InvalidRequest(
            f"the offer's a=fingerprint lines ({'; '.join(' '.join(f) for f in fingerprints)[:200]}) name no "
            f"certificate hash this server checks ({', '.join(X509_DIGEST_ALGORITHMS)}) as colon-separated hex"
        )
