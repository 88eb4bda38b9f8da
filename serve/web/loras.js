// LoRAs on the page: the LoRA folder as a list to add to a load, and a live scale slider per runtime adapter.
import { api } from "./api.js";
import { el } from "./form.js";

const $ = (id) => document.getElementById(id);
const SCALE_MIN = -2; // the slider's range; the API takes −10..10 (type a value in the number box for more)
const SCALE_MAX = 2;

let files = [];

/** Lists the LoRA folder under the load form (only for pipelines whose schema takes `loras`). */
export async function renderLoraFolder(schema) {
  const box = $("lora-fields");
  const takesLoras = Boolean(schema && schema.load_params && schema.load_params.properties.loras);
  box.hidden = !takesLoras;
  if (!takesLoras) return;
  try {
    files = (await api("/loras")).lora_files;
  } catch (err) {
    box.replaceChildren(el("small", { class: "error-text", text: `LoRA folder not readable: ${err.message}` }));
    return;
  }
  const rows = files.map((file, index) => {
    const id = `lora-use-${index}`;
    const fits = file.base_model ? `, for ${file.base_model}` : "";
    // A cluster front lists every worker's folder: a load naming a file fails on a worker without it.
    const missing = file.missing_on && file.missing_on.length ? `; not on ${file.missing_on.join(", ")}` : "";
    const about = file.error || `rank ${file.rank}${fits}, ${file.size_mb} MB${missing}`;
    return el(
      "li",
      { class: "lora-file" },
      el("input", { type: "checkbox", id, "data-path": file.path, disabled: Boolean(file.error) }),
      el("label", { for: id, text: file.path, title: about }),
      el("input", { type: "number", class: "lora-scale", "aria-label": `Scale of ${file.path}`, min: -10, max: 10,
                    step: 0.05, value: 1 }), // prettier-ignore
      el("select", { class: "lora-mode", "aria-label": `Merge mode of ${file.path}` },
         el("option", { value: "permanent_merge", text: "merge" }),
         el("option", { value: "runtime_peft", text: "runtime" })), // prettier-ignore
    );
  });
  box.replaceChildren(
    el("legend", { text: "LoRAs" }),
    files.length
      ? el("ul", { class: "lora-files" }, rows)
      : el("small", { class: "help", text: "No LoRA files: put .safetensors files in the server's LoRA folder." }),
    el("small", { class: "help", text: "Merge: no runtime cost. Runtime: a live scale slider while streaming." }),
  );
}

/** The `loras` load parameter from the ticked files. */
export function readLoras() {
  if ($("lora-fields").hidden) return []; // rows ticked for a pipeline chosen before, which takes LoRAs
  return [...document.querySelectorAll(".lora-file")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({
      path: row.querySelector("input[type=checkbox]").dataset.path,
      scale: Number(row.querySelector(".lora-scale").value),
      merge_mode: row.querySelector(".lora-mode").value,
    }));
}

/** The live sliders' `lora_scales` (empty without runtime adapters): a stream starts with what they show. */
export function readLoraScales() {
  return [...$("lora-live").querySelectorAll("input[type=range]")].map((s) => ({
    path: s.dataset.path,
    scale: Number(s.value),
  }));
}

/** Loaded adapters from the pipeline status; runtime ones get a slider that sends `lora_scales` live. */
export function renderAdapters(status, sendUpdate) {
  const box = $("lora-live");
  const adapters = (status && status.status === "loaded" && status.loaded_lora_adapters) || [];
  // Only when they change: each status read (a stream's start) re-made the sliders at the load's scales, losing
  // what the user had set.
  const key = JSON.stringify(adapters);
  if (box.dataset.shown === key) return;
  box.dataset.shown = key;
  box.hidden = adapters.length === 0;
  box.replaceChildren(
    el("h4", { text: "LoRAs" }),
    ...adapters.map((adapter, index) => {
      const name = adapter.builtin ? `${adapter.path.split("/").pop()} (built in)` : adapter.path;
      if (adapter.merge_mode !== "runtime_peft") {
        return el("div", { class: "field" }, el("span", { text: `${name}: merged at ${adapter.scale}` }));
      }
      const id = `lora-live-${index}`;
      const output = el("output", { for: id, text: String(adapter.scale) });
      const slider = el("input", { type: "range", id, min: SCALE_MIN, max: SCALE_MAX, step: 0.05, value: adapter.scale,
                                   "data-path": adapter.path }); // prettier-ignore
      slider.addEventListener("input", () => {
        output.textContent = slider.value;
        // Every slider's value in one message, so two sliders moved within one debounce both arrive.
        const scales = [...box.querySelectorAll("input[type=range]")];
        sendUpdate({ lora_scales: scales.map((s) => ({ path: s.dataset.path, scale: Number(s.value) })) });
      });
      return el("div", { class: "field" }, el("label", { for: id, text: `${name} scale` }), slider, output);
    }),
  );
}
