// Controls generated from a pipeline's JSON schema (load_params or runtime_params).

let uid = 0;
const nextId = (prefix) => `${prefix}-${++uid}`;

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Flattens `$ref` and `anyOf: [X, {type: null}]` into one plain property schema, with `nullable` set. */
export function resolve(schema, root) {
  let prop = schema;
  if (prop && prop.$ref) {
    const name = prop.$ref.split("/").pop();
    prop = { ...((root.$defs || {})[name] || {}), ...prop };
    delete prop.$ref;
  }
  if (prop && Array.isArray(prop.anyOf)) {
    const nonNull = prop.anyOf.filter((s) => s.type !== "null");
    const nullable = nonNull.length < prop.anyOf.length;
    if (nonNull.length === 1) prop = { ...resolve(nonNull[0], root), ...prop, nullable };
    delete prop.anyOf;
  }
  return prop || {};
}

export function labelText(name) {
  return name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
}

function isIntArray(prop) {
  return prop.type === "array" && prop.items && (prop.items.type === "integer" || prop.items.type === "number");
}

/**
 * One control for one property. Returns {name, row, read(), write(value)} or null when the schema is not simple
 * (objects, arrays of objects, ...). `mode` is "load" (number inputs) or "runtime" (sliders where bounded).
 */
export function makeControl(name, rawProp, root, { mode, onChange } = {}) {
  const prop = resolve(rawProp, root);
  const id = nextId(`${mode}-${name}`);
  const label = el("label", { for: id, text: labelText(name) });
  const help = prop.description ? el("small", { class: "help", id: `${id}-help`, text: prop.description }) : null;
  const describedBy = help ? `${id}-help` : undefined;
  const changed = () => onChange && onChange(name);
  let input;
  let read;
  let write;
  let extra = null;

  if (Array.isArray(prop.enum)) {
    input = el("select", { id, name, "aria-describedby": describedBy });
    if (prop.nullable || prop.default === undefined) input.append(el("option", { value: "", text: "(none)" }));
    for (const option of prop.enum) input.append(el("option", { value: String(option), text: String(option) }));
    read = () => (input.value === "" ? undefined : prop.enum.find((v) => String(v) === input.value));
    write = (v) => (input.value = v === undefined || v === null ? "" : String(v));
    input.addEventListener("change", changed);
  } else if (prop.type === "boolean") {
    if (prop.default === undefined && mode === "runtime") {
      // A one-shot flag (e.g. reset_cache): a button that sends `true` once.
      const button = el("button", { type: "button", id, text: labelText(name), "aria-describedby": describedBy });
      button.addEventListener("click", () => onChange && onChange(name, true));
      return { name, row: el("div", { class: "field field-button" }, button, help), read: () => undefined, write() {} };
    }
    input = el("input", { type: "checkbox", id, name, "aria-describedby": describedBy });
    read = () => input.checked;
    write = (v) => (input.checked = Boolean(v));
    input.addEventListener("change", changed);
    if (prop.default !== undefined) write(prop.default);
    return { name, row: el("div", { class: "field field-check" }, input, label, help), read, write, input, prop };
  } else if (prop.type === "integer" || prop.type === "number") {
    const bounded = prop.minimum !== undefined && prop.maximum !== undefined;
    const step = prop.multipleOf || (prop.type === "integer" ? 1 : bounded ? (prop.maximum - prop.minimum) / 100 : "any");
    if (mode === "runtime" && bounded) {
      input = el("input", {
        type: "range", id, name, min: prop.minimum, max: prop.maximum, step, "aria-describedby": describedBy,
      });
      const output = el("output", { for: id, class: "value" });
      const show = () => (output.textContent = input.value);
      input.addEventListener("input", () => {
        show();
        changed();
      });
      input.addEventListener("change", changed);
      read = () => Number(input.value);
      write = (v) => {
        input.value = String(v);
        show();
      };
      extra = output;
    } else {
      input = el("input", {
        type: "number", id, name, min: prop.minimum, max: prop.maximum, step, "aria-describedby": describedBy,
      });
      read = () => (input.value === "" ? undefined : Number(input.value));
      write = (v) => (input.value = v === undefined || v === null ? "" : String(v));
      input.addEventListener("change", changed);
    }
  } else if (isIntArray(prop)) {
    input = el("input", {
      type: "text", id, name, inputmode: "numeric", placeholder: "e.g. 750, 250", "aria-describedby": describedBy,
    });
    read = () => {
      const text = input.value.trim();
      if (!text) return undefined;
      return text.split(/[\s,]+/).filter(Boolean).map(Number);
    };
    write = (v) => (input.value = Array.isArray(v) ? v.join(", ") : "");
    input.addEventListener("change", changed);
  } else if (prop.type === "string") {
    input = el("input", { type: "text", id, name, maxlength: prop.maxLength, "aria-describedby": describedBy });
    read = () => (input.value === "" ? undefined : input.value);
    write = (v) => (input.value = v ?? "");
    input.addEventListener("change", changed);
  } else {
    return null;
  }
  if (prop.default !== undefined) write(prop.default);
  const row = el("div", { class: "field" }, label, el("div", { class: "control" }, input, extra), help);
  return { name, row, read, write, input, prop };
}

/** Validates a value against simple bounds; returns an error string or null. */
export function check(control) {
  const v = control.read();
  const p = control.prop || {};
  if (v === undefined) return null;
  const values = Array.isArray(v) ? v : [v];
  const bounds = Array.isArray(v) ? p.items || {} : p;
  for (const x of values) {
    if (typeof x === "number") {
      if (Number.isNaN(x)) return `${control.name}: not a number`;
      if (bounds.type === "integer" && !Number.isInteger(x)) return `${control.name}: ${x} is not an integer`;
      if (bounds.minimum !== undefined && x < bounds.minimum) return `${control.name}: ${x} < ${bounds.minimum}`;
      if (bounds.maximum !== undefined && x > bounds.maximum) return `${control.name}: ${x} > ${bounds.maximum}`;
      if (bounds.multipleOf && Math.abs(x / bounds.multipleOf - Math.round(x / bounds.multipleOf)) > 1e-9) {
        return `${control.name}: ${x} is not a multiple of ${bounds.multipleOf}`;
      }
    }
  }
  return null;
}
