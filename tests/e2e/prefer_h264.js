// What a page adds to ask wanrt for H.264 (README, "Choosing the video codec"): after the seed's own addTrack,
// H.264 goes first in that transceiver's codec preferences, so the offer lists it first and the server answers
// with it. The seed's JavaScript itself is unchanged (tests/e2e/seed_client.js).
(() => {
  const addTrack = RTCPeerConnection.prototype.addTrack;
  RTCPeerConnection.prototype.addTrack = function (track, ...streams) {
    const sender = addTrack.call(this, track, ...streams);
    const transceiver = this.getTransceivers().find((t) => t.sender === sender);
    const codecs = RTCRtpReceiver.getCapabilities("video").codecs;
    const isH264 = (codec) => codec.mimeType === "video/H264";
    transceiver.setCodecPreferences([...codecs.filter(isH264), ...codecs.filter((codec) => !isH264(codec))]);
    return sender;
  };
})();
