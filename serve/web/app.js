// wanrt studio: choose and load a pipeline, stream webcam / file / nothing, steer prompts and parameters live.
import { api, uploadAsset } from "./api.js";
import { check, el, makeControl } from "./form.js";
import { startSession } from "./stream.js";

const $ = (id) => document.getElementById(id);

// Runtime fields that have their own UI (or are set by the input choice) rather than a generated control.
const CUSTOM_RUNTIME = new Set(["input_mode", "prompts", "transition", "vace_ref_images"]);
const SEND_DEBOUNCE_MS = 80;

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
      ),
    );
  }
}

function selectPipeline(id) {
  state.selected = id;
  const radio = $(`pipeline-${id}`);
  if (radio) radio.checked = true;
  const p = state.schemas[id];
  buildLoadForm(p);
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
  return params;
}

function showLoadError(message) {
  const box = $("load-error");
  box.textContent = message;
  box.hidden = false;
}

function renderPipelineStatus(s) {
  state.pipelineStatus = s;
  const stage = s.loading_stage ? ` (${s.loading_stage})` : "";
  const who = s.pipeline_id ? `${s.pipeline_id}: ` : "";
  $("load-state-text").textContent = `${who}${s.status.replace("_", " ")}${stage}${s.backend ? ` · ${s.backend}` : ""}`;
  const progress = $("load-progress");
  if (s.status === "loaded") progress.value = 1;
  else if (s.status === "loading" && typeof s.progress === "number") {
    progress.value = s.progress > 1 ? s.progress / 100 : s.progress;
  } else if (s.status === "loading") progress.removeAttribute("value");
  else progress.value = 0;
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
  info(`Loading ${id}…`);
  try {
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
  if (state.session.send(update)) {
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
}

function onMessage(data) {
  if (data.type === "stats") renderStats(data);
  else if (data.type === "error") alertError(`Server rejected an update: ${data.message || JSON.stringify(data)}`);
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
  if (state.session) return;
  const status = await api("/pipeline/status").catch(() => null);
  if (status) renderPipelineStatus(status);
  if (!status || status.status !== "loaded") return alertError("Load a pipeline before starting a stream.");
  const source = $("input-source").value;
  $("start-button").disabled = true;
  info("Starting stream…");
  try {
    const input = await openInput(source);
    state.localStream = input;
    const initialParameters = {
      ...currentRuntimeParams(),
      input_mode: source === "none" ? "text" : "video",
    };
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
    $("session-id").textContent = state.session.sessionId;
    $("stop-button").disabled = false;
    info(`Session ${state.session.sessionId} started; connecting…`);
  } catch (err) {
    alertError(`Could not start the stream: ${err.message}`);
    releaseInput();
    $("start-button").disabled = false;
    info("Not streaming.");
  }
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
  releaseInput();
  $("output-video").srcObject = null;
  $("start-button").disabled = false;
  $("stop-button").disabled = true;
  resetStats();
  info(message);
}

async function stopStream() {
  teardown("Stream stopped.");
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
