// What a test page adds to watch the output the seed's page receives, the seed's JavaScript unchanged: every frame
// the output <video> presents is sampled (requestVideoFrameCallback) as its green channel at full width and a quarter
// of the height (the counter bars are vertical, so the width carries the content), and an Encoded Transform on the
// receiver (receiver_probe_worker.js) notes every encoded frame received and can send a keyframe request.
(() => {
  const worker = new Worker("receiver_probe_worker.js");
  const addTrack = RTCPeerConnection.prototype.addTrack;
  RTCPeerConnection.prototype.addTrack = function (track, ...streams) {
    const sender = addTrack.call(this, track, ...streams);
    const transceiver = this.getTransceivers().find((t) => t.sender === sender);
    transceiver.receiver.transform = new RTCRtpScriptTransform(worker);
    return sender;
  };
  const ask = (message) =>
    new Promise((resolve) => {
      worker.addEventListener("message", ({ data }) => resolve(data), { once: true });
      worker.postMessage(message);
    });

  const presented = []; // { rtpTimestamp, width, height, green (base64, width × height / 4) }
  const canvas = document.createElement("canvas");
  const context = canvas.getContext("2d", { willReadFrequently: true });
  function sample(video) {
    video.requestVideoFrameCallback((_now, metadata) => {
      const width = video.videoWidth, height = video.videoHeight;
      canvas.width = width;
      canvas.height = height / 4;
      context.drawImage(video, 0, 0, width, height / 4);
      const rgba = context.getImageData(0, 0, width, height / 4).data;
      let green = "";
      for (let i = 1; i < rgba.length; i += 4) green += String.fromCharCode(rgba[i]);
      presented.push({ rtpTimestamp: metadata.rtpTimestamp, width, height, green: btoa(green) });
      sample(video);
    });
  }
  addEventListener("DOMContentLoaded", () => sample(document.getElementById("outputVideo")));

  window.receiverProbe = {
    presented: () => presented,
    encodedFrames: async () => (await ask("frames")).frames,
    requestKeyFrame: () => ask("requestKeyFrame"),
  };
})();
