"""ICE plumbing: which addresses the server offers, how fast a vanished peer is noticed, trickled candidates.

aiortc has no per-connection setting for either host addresses or consent freshness: both are module attributes of
aioice, set here once per process, from the server settings.
"""

from __future__ import annotations

import logging

import aioice.ice
from aiortc import RTCConfiguration, RTCIceCandidate, RTCIceServer
from aiortc.sdp import candidate_from_sdp

from serve.assets import echo
from serve.errors import InvalidRequest
from serve.schemas import IceCandidate
from serve.settings import WebRTCSettings

log = logging.getLogger(__name__)

_system_host_addresses = aioice.ice.get_host_addresses
CONSENT_FAILURES = 3


def configure_ice(settings: WebRTCSettings) -> None:
    """Host candidates and consent-freshness timing for every peer connection of this process."""

    if settings.ice_interfaces == "loopback":

        def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
            return ["127.0.0.1"] if use_ipv4 else []
    else:
        # aioice leaves loopback out; a browser on the same machine (the common case for a local GPU server, and
        # Chromium with --allow-loopback-in-peer-connection) pairs fastest on it.
        def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
            addresses = _system_host_addresses(use_ipv4, use_ipv6)
            return (["127.0.0.1"] if use_ipv4 else []) + addresses

    aioice.ice.get_host_addresses = host_addresses
    # RFC 7675 consent checks are how a peer that vanished without a BYE is noticed: after CONSENT_FAILURES
    # unanswered checks the ICE connection closes and the session with it.
    aioice.ice.CONSENT_INTERVAL = max(settings.peer_timeout_s / CONSENT_FAILURES, 0.5)
    aioice.ice.CONSENT_FAILURES = CONSENT_FAILURES


def rtc_configuration(settings: WebRTCSettings) -> RTCConfiguration:
    # Always explicit: aiortc falls back to a public STUN server when given none.
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in settings.ice_servers])


def parse_candidate(candidate: IceCandidate) -> RTCIceCandidate | None:
    """A browser's trickled candidate as aiortc wants it; None for the end-of-candidates marker."""
    text = candidate.candidate.strip()
    if not text:
        return None
    if text.startswith("candidate:"):
        text = text[len("candidate:") :]
    try:
        parsed = candidate_from_sdp(text)
    except Exception as exc:  # aiortc's parser asserts, indexes and converts; any failure means a bad string
        raise InvalidRequest(
            f"malformed ICE candidate {echo(candidate.candidate)} ({type(exc).__name__}{f': {exc}' if str(exc) else ''}"
            "); send the browser's RTCIceCandidate.candidate as it is: 'candidate:<foundation> <component> <protocol> "
            "<priority> <address> <port> typ <type> ...'"
        ) from None
    parsed.sdpMid = candidate.sdpMid
    parsed.sdpMLineIndex = candidate.sdpMLineIndex
    return parsed
