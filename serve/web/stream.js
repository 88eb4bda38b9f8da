// WebRTC session following the Daydream Scope client flow: the `parameters` data channel is created before the
// offer, local ICE candidates are queued until the session id is known, then trickled with PATCH.
import { api } from "./api.js";

export async function startSession({ inputStream, initialParameters, onTrack, onMessage, onStateChange }) {
  const { iceServers } = await api("/webrtc/ice-servers");
  const pc = new RTCPeerConnection({ iceServers });
  let sessionId = null;
  const queued = [];

  const dataChannel = pc.createDataChannel("parameters", { ordered: true });
  dataChannel.onmessage = (event) => {
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    onMessage(data);
  };
  dataChannel.onopen = () => onStateChange("channel-open");
  dataChannel.onclose = () => onStateChange("channel-closed");

  if (inputStream) {
    for (const track of inputStream.getVideoTracks()) pc.addTrack(track, inputStream);
  } else {
    pc.addTransceiver("video", { direction: "recvonly" });
  }
  pc.ontrack = (event) => onTrack(event.streams[0] || new MediaStream([event.track]));
  pc.onconnectionstatechange = () => onStateChange(pc.connectionState);

  const sendCandidate = (candidate) =>
    api(`/webrtc/offer/${sessionId}`, {
      method: "PATCH",
      json: {
        candidates: [
          { candidate: candidate.candidate, sdpMid: candidate.sdpMid, sdpMLineIndex: candidate.sdpMLineIndex },
        ],
      },
    }).catch((err) => console.warn("ICE candidate rejected:", err.message));

  pc.onicecandidate = (event) => {
    if (!event.candidate) return;
    if (sessionId) sendCandidate(event.candidate);
    else queued.push(event.candidate);
  };

  try {
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    const answer = await api("/webrtc/offer", {
      method: "POST",
      json: { sdp: pc.localDescription.sdp, type: pc.localDescription.type, initialParameters },
    });
    sessionId = answer.sessionId;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    for (const candidate of queued.splice(0)) await sendCandidate(candidate);
  } catch (err) {
    pc.close();
    // The server answered but the answer could not be applied: give its seat back now, not at its connect timeout.
    if (sessionId) api(`/webrtc/offer/${sessionId}`, { method: "DELETE" }).catch(() => {});
    throw err;
  }

  return {
    pc,
    dataChannel,
    get sessionId() {
      return sessionId;
    },
    /** true: sent; false: the channel is not open yet (kept to send later); throws a message the peer refuses. */
    send(update) {
      if (dataChannel.readyState !== "open") return false;
      dataChannel.send(JSON.stringify(update)); // a TypeError past the server's max-message-size
      return true;
    },
    async stop() {
      try {
        dataChannel.close();
      } catch {}
      pc.close();
      if (sessionId) await api(`/webrtc/offer/${sessionId}`, { method: "DELETE" }).catch(() => {});
    },
  };
}
