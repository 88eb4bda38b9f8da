const API_BASE = "http://localhost:8000";

// Universal function that works for all pipelines
async function startV2VStream(pipelineId, inputStream, initialParams) {
  // 1. Get ICE servers
  const iceResponse = await fetch(`${API_BASE}/api/v1/webrtc/ice-servers`);
  const { iceServers } = await iceResponse.json();
  
  // 2. Create peer connection
  const pc = new RTCPeerConnection({ iceServers });
  
  let sessionId = null;
  const queuedCandidates = [];
  
  // 3. Create data channel
  const dataChannel = pc.createDataChannel("parameters", { ordered: true });
  
  dataChannel.onopen = () => console.log("Data channel ready");
  dataChannel.onmessage = (event) => {
    const data = JSON.parse(event.data);
    if (data.type === "stream_stopped") {
      console.log("Stream stopped:", data.error_message);
      pc.close();
    }
  };
  
  // 4. Add input video track
  inputStream.getTracks().forEach((track) => {
    if (track.kind === "video") {
      pc.addTrack(track, inputStream);
    }
  });
  
  // 5. Handle output video
  pc.ontrack = (event) => {
    if (event.streams[0]) {
      document.getElementById("outputVideo").srcObject = event.streams[0];
    }
  };
  
  // 6. ICE candidates
  pc.onicecandidate = async (event) => {
    if (event.candidate) {
      if (sessionId) {
        await sendIceCandidate(sessionId, event.candidate);
      } else {
        queuedCandidates.push(event.candidate);
      }
    }
  };
  
  // 7. Create offer
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  
  const response = await fetch(`${API_BASE}/api/v1/webrtc/offer`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      sdp: pc.localDescription.sdp,
      type: pc.localDescription.type,
      initialParameters: {
        input_mode: "video",
        ...initialParams
      }
    })
  });
  
  const answer = await response.json();
  sessionId = answer.sessionId;
  
  await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
  
  for (const candidate of queuedCandidates) {
    await sendIceCandidate(sessionId, candidate);
  }
  
  return { pc, dataChannel, sessionId };
}

async function sendIceCandidate(sessionId, candidate) {
  await fetch(`${API_BASE}/api/v1/webrtc/offer/${sessionId}`, {
    method: "PATCH",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      candidates: [{
        candidate: candidate.candidate,
        sdpMid: candidate.sdpMid,
        sdpMLineIndex: candidate.sdpMLineIndex
      }]
    })
  });
}
