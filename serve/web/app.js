// wanrt studio: choose and load a pipeline, stream webcam / file / nothing, steer prompts and parameters live.
import { api, hasToken, saveFile, uploadAsset } from "./api.js";
import { check, el, makeControl } from "./form.js";
import { readLoraScales, readLoras, renderAdapters, renderLoraFolder } from "./loras.js";
import { Plot } from "./plots.js";
import { startSession } from "./stream.js";

const $ = (id) => document.getElementById(id);

// Runtime fields that have their own UI (or are set by the input choice) rather than a generated control.
const CUSTOM_RUNTIME = new Set(["input_mode", "prompts", "transition", "vace_ref_images", "lora_scales"]);
const CUSTOM_LOAD = new Set(["loras"]); // the LoRA folder list (loras.js)
const SEND_DEBOUNCE_MS = 80;
const DOWNLOAD_POLL_MS = 300;
const PLOT_REDRAW_MS = 1000;
// The plotted stats: key in the stats message (dropped is the per-second rise of `frames_dropped`), and its look.
const PLOTS = [
  ["fps_out", { label: "FPS out", color: "#5aa9ff" }],
  ["latency_ms", { label: "Latency", unit: " ms", color: "#e0a43a", digits: 0 }],
  ["chunk_ms", { label: "Chunk time", unit: " ms", color: "#3fb47a" }],
  ["dropped", { label: "Dropped", unit: "/s", color: "#ff6b6b" }],
];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const state = {
  schemas: {},
  selected: null,
  loadControls: [],
  runtimeControls: new Map(),
  session: null,
  localStream: null,
  fileUrl: null,
  pending: {},
  sendTimer: null,
  vaceRefs: [],
  pipelineStatus: null,
  plots: {},
  droppedBefore: null, // {t, frames} of the previous stats message
  recording: null, // the running recording of this page's session
  recordingBusy: false, // a recording's start or stop is in flight
  starting: false, // a stream's start is in flight
  downloads: {}, // pipeline id -> promise of its weight download
};
window.wanrtUI = state; // for debugging from the console

// ---------------------------------------------------------------- status area

function info(message) {
  $("status").textContent = message;
}

function alertError(message) {
  const box = $("alert");
  box.hidden = false;
  box.replaceChildren(
    el("span", { text: message }),
    el("button", { type: "button", class: "dismiss", "aria-label": "Dismiss error", text: "×", onclick: clearAlert }),
  );
}

function clearAlert() {
  $("alert").hidden = true;
  $("alert").replaceChildren();
}

// ---------------------------------------------------------------- pipelines

function badge(text, kind) {
  return el("span", { class: `badge ${kind}`, text });
}

function renderPipelines() {
  const box = $("pipelines");
  box.querySelectorAll(".pipeline").forEach((n) => n.remove());
  for (const [id, p] of Object.entries(state.schemas)) {
    const inputId = `pipeline-${id}`;
    const radio = el("input", { type: "radio", name: "pipeline", id: inputId, value: id });
    radio.addEventListener("change", () => selectPipeline(id));
    const badges = el(
      "span",
      { class: "badges" },
      badge(`mode: ${p.default_mode}`, "mode"),
      p.weights_present ? badge("weights present", "ok") : badge("weights missing", "warn"),
      p.available ? badge("available", "ok") : badge("not available", "warn"),
    );
    const missing =
      p.missing_files && p.missing_files.length
        ? el(
            "details",
            { class: "help missing" },
            el("summary", { text: `${p.missing_files.length} missing weight file(s)` }),
            el("ul", {}, p.missing_files.map((f) => el("li", {}, el("code", { text: f })))),
          )
        : null;
    const download =
      !p.weights_present && p.missing_files && p.missing_files.length
        ? el(
            "div",
            { class: "download" },
            el("button", {
              type: "button",
              id: `download-${id}`,
              text: "Download weights",
              "aria-label": `Download weights for ${id}`,
              onclick: () => downloadWeights(id).catch(() => {}),
            }),
            el("progress", { id: `download-progress-${id}`, max: 1, value: 0, hidden: true }),
            el("span", { id: `download-text-${id}`, class: "help", role: "status" }),
          )
        : null;
    box.append(
      el(
        "div",
        { class: "pipeline" },
        radio,
        el(
          "label",
          { for: inputId },
          el("strong", { text: p.name || id }),
          el("code", { text: id }),
          badges,
          el("span", { class: "desc", text: p.description || "" }),
          missing,
        ),
        download,
      ),
    );
  }
  if (state.selected && $(`pipeline-${state.selected}`)) $(`pipeline-${state.selected}`).checked = true;
  for (const id of Object.keys(state.downloads)) {
    if ($(`download-${id}`)) $(`download-${id}`).disabled = true;
  }
}

// ---------------------------------------------------------------- weight downloads

/** Starts (or joins) the download of a pipeline's weights; resolves once every file is present. */
function downloadWeights(id) {
  if (state.downloads[id]) return state.downloads[id];
  const promise = (async () => {
    const button = $(`download-${id}`);
    if (button) button.disabled = true;
    showDownload(id, { text: "Starting the download…" });
    await api("/models/download", { method: "POST", json: { pipeline_id: id } });
    for (;;) {
      const s = await api(`/models/status?pipeline_id=${encodeURIComponent(id)}`);
      const p = s.progress;
      if (p.state === "error") throw new Error(p.error || "the download failed");
      if (s.downloaded && p.state !== "downloading") return s;
      if (p.state !== "downloading") {
        throw new Error(`the download is ${p.state} and files are still missing; start it again`);
      }
      const file = p.current_artifact ? ` · ${p.current_artifact}` : "";
      showDownload(id, { fraction: p.percentage / 100, text: `${p.percentage.toFixed(0)} %${file}` });
      await sleep(DOWNLOAD_POLL_MS);
    }
  })();
  state.downloads[id] = promise;
  promise.then(
    async () => {
      delete state.downloads[id];
      info(`${id}: weights downloaded.`);
      const { pipelines } = await api("/pipelines/schemas");
      state.schemas = pipelines;
      renderPipelines();
    },
    (err) => {
      delete state.downloads[id];
      alertError(`Download of ${id}'s weights failed: ${err.message}`);
      showDownload(id, { text: `Failed: ${err.message}` });
      if ($(`download-${id}`)) $(`download-${id}`).disabled = false;
    },
  );
  return promise;
}

function showDownload(id, { fraction, text }) {
  const progress = $(`download-progress-${id}`);
  if (progress) {
    progress.hidden = false;
    if (typeof fraction === "number") progress.value = fraction;
    else progress.removeAttribute("value");
  }
  if ($(`download-text-${id}`)) $(`download-text-${id}`).textContent = text;
}

function selectPipeline(id) {
  state.selected = id;
  const radio = $(`pipeline-${id}`);
  if (radio) radio.checked = true;
  const p = state.schemas[id];
  buildLoadForm(p);
  renderLoraFolder(p);
  buildRuntimeControls(p);
  if (!state.session) $("input-source").value = p.default_mode === "text" ? "none" : "webcam";
  updateFileField();
  $("load-error").hidden = true;
}

function buildLoadForm(p) {
  const root = p.load_params || {};
  const box = $("load-fields");
  box.replaceChildren();
  state.loadControls = [];
  const skipped = [];
  for (const [name, prop] of Object.entries(root.properties || {})) {
    if (CUSTOM_LOAD.has(name)) continue;
    const control = makeControl(name, prop, root, { mode: "load" });
    if (!control) {
      skipped.push(name);
      continue;
    }
    state.loadControls.push(control);
    box.append(control.row);
  }
  if (skipped.length) box.append(el("small", { class: "help", text: `Not editable here: ${skipped.join(", ")}` }));
}

function buildRuntimeControls(p) {
  const root = p.runtime_params || {};
  const box = $("runtime-fields");
  box.replaceChildren();
  state.runtimeControls = new Map();
  const props = root.properties || {};
  for (const [name, prop] of Object.entries(props)) {
    if (CUSTOM_RUNTIME.has(name)) continue;
    const control = makeControl(name, prop, root, { mode: "runtime", onChange: queueChange });
    if (!control) continue;
    state.runtimeControls.set(name, control);
    box.append(control.row);
  }
  $("vace-block").hidden = !("vace_ref_images" in props);
  const transition = props.transition ? resolveDef(root, props.transition) : null;
  const steps = transition && transition.properties && transition.properties.num_steps;
  if (steps) {
    $("transition-steps").min = steps.minimum ?? 0;
    $("transition-steps").max = steps.maximum ?? 64;
  }
}

function resolveDef(root, prop) {
  if (prop && prop.$ref) return (root.$defs || {})[prop.$ref.split("/").pop()] || {};
  return prop;
}

// ---------------------------------------------------------------- load

function readLoadParams() {
  const params = {};
  for (const control of state.loadControls) {
    const problem = check(control);
    if (problem) throw new Error(`Invalid load parameter ${problem}`);
    const value = control.read();
    if (value !== undefined) params[control.name] = value;
  }
  const loras = readLoras();
  if (loras.length) params.loras = loras;
  return params;
}

function showLoadError(message) {
  const box = $("load-error");
  box.textContent = message;
  box.hidden = false;
}

function renderPipelineStatus(s) {
  state.pipelineStatus = s;
  renderAdapters(s, queueUpdate);
  const stage = s.loading_stage ? ` (${s.loading_stage})` : "";
  const who = s.pipeline_id ? `${s.pipeline_id}: ` : "";
  $("load-state-text").textContent = `${who}${s.status.replace("_", " ")}${stage}${s.backend ? ` · ${s.backend}` : ""}`;
  renderBackends($("load-backends"), s.status === "loaded" ? s.backends : null);
  const progress = $("load-progress");
  if (s.status === "loaded") progress.value = 1;
  else if (s.status === "loading" && typeof s.progress === "number") {
    progress.value = s.progress > 1 ? s.progress / 100 : s.progress;
  } else if (s.status === "loading") progress.removeAttribute("value");
  else progress.value = 0;
}

/** One chip per component (dit_step, vae_encode, vae_decode) naming its backend; the reason shows on hover. */
function renderBackends(list, backends) {
  // Only when they change: every stats message re-made them, and a keyboard user's focus on a chip was lost.
  const key = JSON.stringify(backends || {});
  if (list.dataset.shown === key) return;
  list.dataset.shown = key;
  const entries = Object.entries(backends || {});
  list.hidden = !entries.length;
  list.replaceChildren(
    ...entries.map(([component, b]) =>
      el(
        "li",
        { class: "backend", title: b.reason || "", tabindex: 0, "aria-label": `${component}: ${b.backend}. ${b.reason || ""}` },
        el("span", { class: "component", text: component }),
        el("strong", { text: b.backend }),
      ),
    ),
  );
}

async function loadPipeline(event) {
  event.preventDefault();
  clearAlert();
  $("load-error").hidden = true;
  const id = state.selected;
  if (!id) return showLoadError("Choose a pipeline first.");
  let loadParams;
  try {
    loadParams = readLoadParams();
  } catch (err) {
    return showLoadError(err.message);
  }
  $("load-button").disabled = true;
  try {
    if (state.downloads[id]) {
      info(`Waiting for ${id}'s weights to download; it loads after.`);
      $("load-state-text").textContent = `${id}: waiting for the download`;
      await state.downloads[id].catch((err) => {
        throw new Error(`not loaded: the download failed: ${err.message}`);
      });
    }
    info(`Loading ${id}…`);
    await api("/pipeline/load", { method: "POST", json: { pipeline_id: id, load_params: loadParams } });
    await waitForLoad();
  } catch (err) {
    showLoadError(err.message);
    alertError(`Could not load ${id}: ${err.message}`);
    info(`Loading ${id} failed.`);
  } finally {
    $("load-button").disabled = false;
  }
}

/** Polls the pipeline status until it settles, showing stage and progress; throws with the server's error. */
async function waitForLoad() {
  for (;;) {
    const s = await api("/pipeline/status");
    renderPipelineStatus(s);
    if (s.status === "loaded") {
      info(`${s.pipeline_id} loaded${s.backend ? ` (backend ${s.backend})` : ""}. Start a stream.`);
      return s;
    }
    if (s.status === "error" || s.status === "not_loaded") throw new Error(`Load failed: ${s.error || s.status}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function unloadPipeline() {
  clearAlert();
  try {
    await api("/pipeline/unload", { method: "POST", json: {} }); // JSON, like every POST: see serve/access.py
    renderPipelineStatus(await api("/pipeline/status"));
    info("Pipeline unloaded.");
  } catch (err) {
    alertError(`Unload failed: ${err.message}`);
  }
}

// ---------------------------------------------------------------- runtime parameters

function queueChange(name, value) {
  const control = state.runtimeControls.get(name);
  if (value === undefined && control) {
    const problem = check(control);
    if (control.input) control.input.setAttribute("aria-invalid", problem ? "true" : "false");
    if (problem) return alertError(`Not sent: ${problem}`);
    value = control.read();
    if (value === undefined) return;
  }
  queueUpdate({ [name]: value });
}

function queueUpdate(update) {
  Object.assign(state.pending, update);
  clearTimeout(state.sendTimer);
  state.sendTimer = setTimeout(flushUpdates, SEND_DEBOUNCE_MS);
}

function flushUpdates() {
  const update = state.pending;
  if (!Object.keys(update).length) return;
  if (!state.session) {
    state.pending = {};
    if (!("reset_cache" in update)) info("Saved; the values are sent when the stream starts.");
    return;
  }
  let sent;
  try {
    sent = state.session.send(update);
  } catch (err) {
    state.pending = {}; // else every later change would send it again, and fail again
    return alertError(`Could not send ${Object.keys(update).join(", ")} (${err.message}); shorten it and try again.`);
  }
  if (sent) {
    state.pending = {};
    info(`Sent ${Object.keys(update).join(", ")}.`);
  } else {
    info("Data channel not open yet; the update will be sent when it opens.");
  }
}

function currentRuntimeParams() {
  const params = {};
  for (const control of state.runtimeControls.values()) {
    if (check(control)) continue;
    const value = control.read();
    if (value !== undefined) params[control.name] = value;
  }
  params.prompts = readPrompts();
  if (state.vaceRefs.length) params.vace_ref_images = state.vaceRefs.map((r) => r.path);
  const scales = readLoraScales(); // set before Start: the page said they would be sent, and they were not
  if (scales.length) params.lora_scales = scales;
  return params;
}

// ---------------------------------------------------------------- prompts

function addPrompt(text = "", weight = 1.0) {
  const list = $("prompts");
  const n = list.children.length + 1;
  const textId = `prompt-text-${Date.now()}-${n}`;
  const weightId = `${textId}-w`;
  const item = el(
    "li",
    { class: "prompt" },
    el("label", { for: textId, class: "prompt-label", text: `Prompt ${n}` }),
    el("textarea", { id: textId, rows: 2, class: "prompt-text", maxlength: 4096, value: text }),
    el(
      "div",
      { class: "prompt-row" },
      el("label", { for: weightId, text: "Weight" }),
      el("input", { type: "number", id: weightId, class: "prompt-weight", min: 0, max: 100, step: 0.1, value: weight }),
      el("button", { type: "button", class: "remove", text: "Remove", onclick: () => removePrompt(item) }),
    ),
  );
  item.querySelector("textarea").value = text;
  list.append(item);
  renumberPrompts();
}

function removePrompt(item) {
  item.remove();
  renumberPrompts();
}

function renumberPrompts() {
  [...$("prompts").children].forEach((item, i) => {
    item.querySelector(".prompt-label").textContent = `Prompt ${i + 1}`;
    item.querySelector(".remove").setAttribute("aria-label", `Remove prompt ${i + 1}`);
    item.querySelector(".prompt-weight").setAttribute("aria-label", `Prompt ${i + 1} weight`);
  });
}

function readPrompts() {
  return [...$("prompts").children]
    .map((item) => ({
      text: item.querySelector(".prompt-text").value.trim(),
      weight: Number(item.querySelector(".prompt-weight").value || 1),
    }))
    .filter((p) => p.text);
}

function applyPrompts() {
  const prompts = readPrompts();
  if (!prompts.length) return alertError("Add at least one prompt with text.");
  const steps = Number($("transition-steps").value || 0);
  if (!state.session) return info("Prompts saved; they are sent when the stream starts.");
  if (steps > 0) queueUpdate({ transition: { target_prompts: prompts, num_steps: steps } });
  else queueUpdate({ prompts });
}

// ---------------------------------------------------------------- VACE reference images

async function uploadVace() {
  const files = [...$("vace-file").files];
  if (!files.length) return;
  clearAlert();
  try {
    for (const file of files) {
      info(`Uploading ${file.name}…`);
      const asset = await uploadAsset(file);
      state.vaceRefs.push({ name: file.name, path: asset.path });
    }
  } catch (err) {
    alertError(`Upload failed: ${err.message}`);
  }
  $("vace-file").value = "";
  renderVace();
  queueUpdate({ vace_ref_images: state.vaceRefs.map((r) => r.path) });
}

function renderVace() {
  $("vace-list").replaceChildren(...state.vaceRefs.map((r) => el("li", {}, el("code", { text: r.path }))));
}

function clearVace() {
  state.vaceRefs = [];
  renderVace();
  queueUpdate({ vace_ref_images: [] });
}

// ---------------------------------------------------------------- streaming

function updateFileField() {
  $("file-field").hidden = $("input-source").value !== "file";
}

async function openInput(source) {
  const video = $("input-video");
  if (source === "webcam") {
    const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    video.removeAttribute("src");
    video.srcObject = stream;
    return { stream, stopTracks: true };
  }
  if (source === "file") {
    const file = $("input-file").files[0];
    if (!file) throw new Error("Choose a video file first.");
    if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
    state.fileUrl = URL.createObjectURL(file);
    video.srcObject = null;
    video.src = state.fileUrl;
    video.loop = true;
    video.muted = true;
    await video.play();
    const capture = video.captureStream || video.mozCaptureStream;
    if (!capture) throw new Error("This browser cannot capture a stream from a video element.");
    return { stream: capture.call(video), stopTracks: false };
  }
  video.srcObject = null;
  video.removeAttribute("src");
  video.load();
  return { stream: null, stopTracks: false };
}

function renderStats(data) {
  for (const dd of document.querySelectorAll("[data-stat]")) {
    const v = data[dd.dataset.stat];
    if (v === undefined || v === null) continue;
    dd.textContent = typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(1)) : String(v);
  }
}

function resetStats() {
  for (const dd of document.querySelectorAll("[data-stat]")) dd.textContent = "–";
  $("session-id").textContent = "–";
  renderBackends($("stream-backends"), null);
}

// ---------------------------------------------------------------- plots

function setupPlots() {
  for (const [key, options] of PLOTS) state.plots[key] = new Plot($(`plot-${key}`), options);
  drawPlots();
  setInterval(drawPlots, PLOT_REDRAW_MS); // the window scrolls even when no stats arrive
  window.addEventListener("resize", drawPlots);
}

function drawPlots() {
  const now = performance.now();
  for (const plot of Object.values(state.plots)) plot.draw(now);
}

function clearPlots() {
  for (const plot of Object.values(state.plots)) plot.clear();
  state.droppedBefore = null;
  drawPlots();
}

function plotStats(data) {
  const now = performance.now();
  for (const key of ["fps_out", "latency_ms", "chunk_ms"]) state.plots[key].push(now, data[key]);
  if (typeof data.frames_dropped === "number") {
    const before = state.droppedBefore;
    if (before && now > before.t) {
      state.plots.dropped.push(now, Math.max(0, data.frames_dropped - before.frames) / ((now - before.t) / 1000));
    }
    state.droppedBefore = { t: now, frames: data.frames_dropped };
  }
  drawPlots();
}

function onStats(data) {
  renderStats(data);
  renderBackends($("stream-backends"), data.backends);
  plotStats(data);
  followRecording(data.recording);
}

function onMessage(data) {
  if (data.type === "stats") onStats(data);
  else if (data.type === "error" && data.error === "NoInputVideo") {
    alertError("This stream sends no video, so nothing is generated: stop it and start again with a camera or a file, or with input None for text mode.");
  } else if (data.type === "error") alertError(`Server rejected an update: ${data.message || JSON.stringify(data)}`);
  else if (data.type === "stream_stopped") {
    alertError(`Stream stopped${data.error_message ? `: ${data.error_message}` : "."}`);
    teardown("Stream stopped by the server.");
  }
}

function onStateChange(s) {
  if (s === "channel-closed") {
    // The server closes the channel when it ends a session; stream_stopped normally comes first.
    alertError("Stream stopped: the server closed the connection.");
    teardown("Stream ended.");
  } else if (s === "channel-open") {
    info("Streaming. Parameter changes are sent live.");
    flushUpdates();
  } else if (s === "failed") {
    alertError("The WebRTC connection failed.");
    teardown("Connection failed.");
  } else if (s === "connecting") info("Connecting…");
}

async function startStream() {
  clearAlert();
  // One start at a time: a second click during the first's awaits opened a second camera and session, and the
  // first were never closed.
  if (state.session || state.starting) return;
  state.starting = true;
  $("start-button").disabled = true;
  try {
    await openStream();
  } finally {
    state.starting = false;
  }
}

async function openStream() {
  let status;
  try {
    status = await api("/pipeline/status");
  } catch (err) {
    $("start-button").disabled = false;
    return alertError(`Could not read the pipeline's status: ${err.message}`);
  }
  renderPipelineStatus(status);
  if (status.status !== "loaded") {
    $("start-button").disabled = false;
    return alertError("Load a pipeline before starting a stream.");
  }
  const source = $("input-source").value;
  // The parameters sent are the loaded pipeline's: the selection may show another one's controls.
  if (status.pipeline_id !== state.selected && state.schemas[status.pipeline_id]) {
    selectPipeline(status.pipeline_id);
    $("input-source").value = source;
    updateFileField();
  }
  info("Starting stream…");
  try {
    const input = await openInput(source);
    state.localStream = input;
    const initialParameters = {
      ...currentRuntimeParams(),
      input_mode: source === "none" ? "text" : "video",
    };
    if ($("record-from-start").checked) initialParameters.recording = true;
    clearPlots();
    state.pending = {};
    // Callbacks of a session that was already torn down (or replaced) are ignored.
    const token = {};
    state.token = token;
    const live = (fn) => (arg) => state.token === token && fn(arg);
    state.session = await startSession({
      inputStream: input.stream,
      initialParameters,
      onTrack: live((stream) => {
        $("output-video").srcObject = stream;
      }),
      onMessage: live(onMessage),
      onStateChange: live(onStateChange),
    });
    if (state.token !== token) {
      // Stopped by the server (stream_stopped) while the answer was being applied: nothing to keep.
      state.session.stop();
      state.session = null;
      return;
    }
    setPipelineChoiceLocked(true);
    $("session-id").textContent = state.session.sessionId;
    $("stop-button").disabled = false;
    recordState(initialParameters.recording ? "Recording from the first frame…" : "Record saves what is sent from now on.");
    renderRecordButtons();
    // The data channel may have opened (and said so) while the answer was being applied.
    if (state.session.dataChannel.readyState !== "open") info(`Session ${state.session.sessionId} started; connecting…`);
  } catch (err) {
    alertError(`Could not start the stream: ${err.message}`);
    releaseInput();
    $("start-button").disabled = false;
    info("Not streaming.");
  }
}

/** While a stream runs, its controls are the loaded pipeline's: choosing another pipeline waits for Stop. */
function setPipelineChoiceLocked(locked) {
  for (const radio of document.querySelectorAll("input[name=pipeline]")) radio.disabled = locked;
}

function releaseInput() {
  const input = state.localStream;
  if (input && input.stream && input.stopTracks) input.stream.getTracks().forEach((t) => t.stop());
  const video = $("input-video");
  video.pause();
  video.srcObject = null;
  state.localStream = null;
}

function teardown(message) {
  const session = state.session;
  state.session = null;
  state.token = null;
  if (session) session.stop();
  setPipelineChoiceLocked(false);
  releaseInput();
  $("output-video").srcObject = null;
  $("start-button").disabled = false;
  $("stop-button").disabled = true;
  resetStats();
  if (state.recording) {
    // Ending the session ends its recording; the file stays on the server.
    const id = state.recording.id;
    state.recording = null;
    settleRecording(id);
  } else if ($("record-download").hidden) {
    recordState("Start a stream to record it.");
  }
  renderRecordButtons();
  info(message);
}

async function stopStream() {
  teardown("Stream stopped.");
}

// ---------------------------------------------------------------- recording

function recordState(message) {
  $("record-state").textContent = message;
}

function renderRecordButtons() {
  const live = Boolean(state.session && state.session.sessionId);
  // While a start or stop is in flight (a stop waits for the MP4), neither button: the stats tick re-enabled them.
  $("record-button").disabled = !live || Boolean(state.recording) || state.recordingBusy;
  $("record-stop-button").disabled = !live || !state.recording || state.recordingBusy;
}

async function startRecording() {
  const sessionId = state.session && state.session.sessionId;
  if (!sessionId || state.recordingBusy) return;
  state.recordingBusy = true;
  renderRecordButtons();
  try {
    const { recording } = await api(`/recordings/${sessionId}/start`, { method: "POST", json: {} });
    state.recording = recording;
    $("record-download").hidden = true;
    recordState(`Recording ${recording.id}…`);
    refreshRecordings();
  } catch (err) {
    alertError(`Could not start recording: ${err.message}`);
  }
  state.recordingBusy = false;
  renderRecordButtons();
}

async function stopRecording() {
  const sessionId = state.session && state.session.sessionId;
  if (!sessionId || state.recordingBusy) return;
  state.recordingBusy = true;
  renderRecordButtons();
  try {
    const { recording } = await api(`/recordings/${sessionId}/stop`, { method: "POST", json: {} });
    state.recording = null;
    offerDownload(recording);
  } catch (err) {
    alertError(`Could not stop recording: ${err.message}`);
  }
  state.recordingBusy = false;
  renderRecordButtons();
  refreshRecordings();
}

/** The stats message says what the server is recording (a recording may start with the stream, or stop itself). */
function followRecording(recording) {
  if (recording) {
    const known = state.recording;
    state.recording = { ...recording, seen: true };
    const left = recording.frames_dropped ? `, ${recording.frames_dropped} left out (encoder behind)` : "";
    if (!known || known.id !== recording.id) recordState(`Recording ${recording.id}…`); // said once, not each second
    $("record-frames").textContent = `${recording.frames} frames${left}`;
  } else if (state.recording && state.recording.seen) {
    // A stats message that went out before a Record click says null too: only one after a sighting counts.
    const id = state.recording.id;
    state.recording = null;
    settleRecording(id);
  }
  renderRecordButtons();
}

/** Waits for a recording the server is finishing (the stream ended, or it stopped itself) and offers it. */
async function settleRecording(id) {
  for (let i = 0; i < 50; i++) {
    const { recordings } = await api("/recordings").catch(() => ({ recordings: [] }));
    const recording = recordings.find((r) => r.id === id);
    if (recording && recording.state !== "recording") {
      offerDownload(recording);
      renderRecordingList(recordings);
      return;
    }
    await sleep(200);
  }
}

function offerDownload(recording) {
  $("record-frames").textContent = "";
  const link = $("record-download");
  link.href = recording.url;
  link.setAttribute("download", `wanrt-${recording.id}.mp4`);
  link.hidden = recording.state !== "done" || !recording.frames;
  const why = recording.error ? ` (${recording.error})` : "";
  recordState(
    `Recorded ${recording.id}: ${recording.frames} frames, ${recording.duration_s} s, ${megabytes(recording.size_bytes)}${why}.`,
  );
}

function megabytes(bytes) {
  return `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 2 : 1)} MB`;
}

async function refreshRecordings() {
  try {
    renderRecordingList((await api("/recordings")).recordings);
  } catch (err) {
    alertError(`Could not list the recordings: ${err.message}`);
  }
}

function renderRecordingList(recordings) {
  const items = recordings.map((r) => {
    const when = new Date(r.started_at * 1000).toLocaleString();
    const frames = r.frames === null || r.frames === undefined ? "" : ` · ${r.frames} frames`;
    const detail = `${r.state} · ${megabytes(r.size_bytes)}${frames} · ${when}`;
    const name = r.state === "done" ? el("a", { href: r.url, download: `wanrt-${r.id}.mp4`, text: r.id }) : el("code", { text: r.id });
    return el("li", {}, name, el("span", { class: "help", text: detail }));
  });
  $("recordings").replaceChildren(...(items.length ? items : [el("li", { class: "help", text: "No recordings yet." })]));
}

// ---------------------------------------------------------------- start up

async function init() {
  $("load-form").addEventListener("submit", loadPipeline);
  $("unload-button").addEventListener("click", unloadPipeline);
  $("input-source").addEventListener("change", updateFileField);
  $("start-button").addEventListener("click", startStream);
  $("stop-button").addEventListener("click", stopStream);
  $("add-prompt").addEventListener("click", () => addPrompt());
  $("apply-prompts").addEventListener("click", applyPrompts);
  $("vace-file").addEventListener("change", uploadVace);
  $("vace-clear").addEventListener("click", clearVace);
  $("record-button").addEventListener("click", startRecording);
  $("record-stop-button").addEventListener("click", stopRecording);
  $("recordings-refresh").addEventListener("click", refreshRecordings);
  // The API's download links (recordings) go through saveFile where the server wants a token.
  document.addEventListener("click", (event) => {
    const link = event.target.closest && event.target.closest("a[download][href^='/api/v1/']");
    if (!link || !hasToken()) return;
    event.preventDefault();
    saveFile(link.getAttribute("href"), link.getAttribute("download")).catch((err) =>
      alertError(`Could not download ${link.getAttribute("download")}: ${err.message}`),
    );
  });
  setupPlots();
  refreshRecordings();
  window.addEventListener("beforeunload", () => state.session && state.session.stop());
  addPrompt("A beautiful landscape", 1.0);

  try {
    const [{ pipelines }, status] = await Promise.all([api("/pipelines/schemas"), api("/pipeline/status")]);
    state.schemas = pipelines;
    renderPipelines();
    renderPipelineStatus(status);
    const first = status.pipeline_id && pipelines[status.pipeline_id] ? status.pipeline_id : null;
    const fallback = Object.keys(pipelines).find((id) => pipelines[id].available) || Object.keys(pipelines)[0];
    if (first || fallback) selectPipeline(first || fallback);
    if (status.status === "loaded" && status.load_params) {
      for (const control of state.loadControls) {
        if (control.name in status.load_params) control.write(status.load_params[control.name]);
      }
    }
    info(status.status === "loaded" ? `${status.pipeline_id} is loaded.` : "Choose a pipeline and load it.");
    if (status.status === "loading") {
      info(`${status.pipeline_id} is loading…`);
      waitForLoad().catch((err) => showLoadError(err.message));
    } else if (status.status === "error" && status.error) {
      showLoadError(`Last load failed: ${status.error}`);
    }
  } catch (err) {
    alertError(`Could not read the pipelines: ${err.message}`);
    info("Server not reachable.");
  }
}

init();
