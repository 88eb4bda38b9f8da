// Line plots of the last minute of a stat, drawn on a canvas by hand (four lines need no chart library).

const WINDOW_S = 60;
const PAD = { left: 4, right: 4, top: 18, bottom: 4 }; // CSS px; the top holds the label
const BACKGROUND = "#0d1014";
const GRID = "#2b313c";
const TEXT = "#9aa3b2";

/** A round upper bound for the y axis: 1, 2 or 5 times a power of ten, at least `value`. */
export function niceCeil(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

export class Plot {
  constructor(canvas, { label, unit = "", color, digits = 1 }) {
    this.canvas = canvas;
    this.label = label;
    this.unit = unit;
    this.color = color;
    this.digits = digits;
    this.samples = []; // {t: ms since page load, v}
    this.max = 1;
    this.last = null; // where the newest sample was drawn: {x, y} in CSS px
  }

  push(t, value) {
    if (typeof value !== "number" || !Number.isFinite(value)) return;
    this.samples.push({ t, v: value });
    const oldest = t - WINDOW_S * 1000;
    while (this.samples.length && this.samples[0].t < oldest) this.samples.shift();
  }

  clear() {
    this.samples = [];
    this.last = null;
  }

  /** Canvas pixels follow its CSS size and the screen's pixel ratio, so lines stay sharp. */
  resize() {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(this.canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(this.canvas.clientHeight * ratio));
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
    }
    return ratio;
  }

  xOf(t, now) {
    const width = this.canvas.clientWidth - PAD.left - PAD.right;
    return PAD.left + width * (1 - (now - t) / (WINDOW_S * 1000));
  }

  yOf(value) {
    const height = this.canvas.clientHeight - PAD.top - PAD.bottom;
    return PAD.top + height * (1 - Math.min(value, this.max) / this.max);
  }

  draw(now) {
    const ratio = this.resize();
    const ctx = this.canvas.getContext("2d");
    const width = this.canvas.clientWidth;
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = BACKGROUND;
    ctx.fillRect(0, 0, width, this.canvas.clientHeight);
    this.max = niceCeil(Math.max(0, ...this.samples.map((s) => s.v)) * 1.1);

    ctx.strokeStyle = GRID;
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (const fraction of [0, 0.5, 1]) {
      const y = Math.round(this.yOf(this.max * fraction)) + 0.5;
      ctx.moveTo(PAD.left, y);
      ctx.lineTo(width - PAD.right, y);
    }
    ctx.stroke();

    const newest = this.samples.at(-1);
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "top";
    ctx.fillStyle = TEXT;
    const current = newest ? `${newest.v.toFixed(this.digits)}${this.unit}` : "–";
    ctx.fillText(`${this.label}: ${current}`, PAD.left, 3);
    ctx.textAlign = "right";
    ctx.fillText(`max ${this.max}${this.unit} · 60 s`, width - PAD.right, 3);
    ctx.textAlign = "left";

    this.last = null;
    if (!this.samples.length) return;
    ctx.strokeStyle = this.color;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    ctx.beginPath();
    this.samples.forEach((s, i) => {
      const x = this.xOf(s.t, now);
      const y = this.yOf(s.v);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    if (this.samples.length === 1) ctx.lineTo(this.xOf(newest.t, now) - 2, this.yOf(newest.v));
    ctx.stroke();
    this.last = { x: this.xOf(newest.t, now), y: this.yOf(newest.v) };
  }
}
