function stopStream(pc, dataChannel) {
  if (dataChannel) dataChannel.close();
  if (pc) pc.close();
}
