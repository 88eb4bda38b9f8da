// The receiver side of tests/e2e/receiver_probe.js: a WebRTC Encoded Transform that passes every received frame
// through unchanged, noting its type (key/delta) and RTP timestamp, and sends a keyframe request (RTCP PLI) to the
// server when the page asks for one.
let transformer = null;
const frames = []; // { type, rtpTimestamp, at } in arrival order; `at` in ms since the epoch (the page's clock too)
const now = () => performance.timeOrigin + performance.now();

onrtctransform = (event) => {
  transformer = event.transformer;
  const note = new TransformStream({
    transform(frame, controller) {
      frames.push({ type: frame.type, rtpTimestamp: frame.getMetadata().rtpTimestamp, at: now() });
      controller.enqueue(frame);
    },
  });
  transformer.readable.pipeThrough(note).pipeTo(transformer.writable);
};

onmessage = async ({ data }) => {
  if (data === "frames") {
    postMessage({ frames });
  } else if (data === "requestKeyFrame") {
    const at = now();
    try {
      await transformer.sendKeyFrameRequest();
      postMessage({ requestedAt: at });
    } catch (error) {
      postMessage({ error: `${error}` });
    }
  }
};
