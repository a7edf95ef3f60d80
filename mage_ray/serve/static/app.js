// mage_ray playground: plain JavaScript, no framework, no build step (see mage_ray/serve/playground.py).
// Reads v1/objectives, streams v1/generate (fetch + ReadableStream: EventSource cannot POST) and draws v1/front.
// Every URL is relative, so the page also works under a Serve route prefix (open <prefix>/playground).
"use strict";

const TOKEN_KEY = "mage_ray.token";
const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (sel, root = document) => root.querySelector(sel);

const state = {
  info: null, // GET v1/objectives
  front: null, // GET v1/front
  mu: { a: [], b: [] }, // the two preferences, each on the simplex
  scores: { a: null, b: null }, // per-objective scores of the texts just generated
  controller: null, // AbortController of the generation in flight
};

// ----- helpers -----

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmt = (v, d = 2) => (v === null || v === undefined ? "n/a" : Number(v).toFixed(d));
const prefLabel = (mu) => `(${mu.map((v) => fmt(v)).join(", ")})`;
const shown = () => ($("#compare").checked ? ["a", "b"] : ["a"]);

// ----- the server: token, JSON, errors -----

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(extra = {}) {
  const h = { ...extra };
  if (token()) h.Authorization = `Bearer ${token()}`;
  return h;
}

class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

async function apiError(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let param = null;
  try {
    const body = await resp.json();
    if (body && body.error) ({ message, param } = body.error);
  } catch (_) {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, message, param);
}

async function getJson(path) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) throw await apiError(resp);
  return resp.json();
}

function showError(err, where) {
  const box = $("#error");
  let text = where ? `${where.toUpperCase()}: ` : "";
  if (err instanceof ApiError) {
    text += `server error ${err.status}${err.param ? ` (field ${err.param})` : ""}: ${err.message}`;
    if (err.status === 401) text += '\nEnter the server\'s API token above and press "Use token".';
  } else {
    text += `error: ${err.message || err}`;
  }
  box.textContent = box.hidden ? text : `${box.textContent}\n${text}`;
  box.hidden = false;
}

function clearError() {
  const box = $("#error");
  box.hidden = true;
  box.textContent = "";
}

// ----- preference sliders, kept on the simplex -----

/** mu with entry i set to v and the others rescaled proportionally so that the sum stays 1. */
function rebalance(mu, i, v) {
  v = Math.min(1, Math.max(0, v));
  const rest = mu.reduce((s, x, j) => (j === i ? s : s + x), 0);
  return mu.map((x, j) => {
    if (j === i) return v;
    return rest > 1e-12 ? (x * (1 - v)) / rest : (1 - v) / (mu.length - 1);
  });
}

function buildSliders(which) {
  const box = $(`#pref-${which} .sliders`);
  box.replaceChildren();
  state.info.objectives.forEach((name, i) => {
    const id = `mu-${which}-${i}`;
    const input = el("input", { id, type: "range", min: "0", max: "1", step: "0.01" });
    input.addEventListener("input", () => {
      state.mu[which] = rebalance(state.mu[which], i, Number(input.value));
      syncSliders(which);
      drawFront();
    });
    const row = el("div", { class: "slider" });
    row.append(el("label", { for: id, title: name }, name), input, el("output", { for: id }));
    box.append(row);
  });
  syncSliders(which);
}

function syncSliders(which) {
  const mu = state.mu[which];
  const names = state.info.objectives;
  document.querySelectorAll(`#pref-${which} .slider`).forEach((row, i) => {
    const input = $("input", row);
    input.value = String(mu[i]);
    input.setAttribute("aria-valuetext", `${names[i]} ${fmt(mu[i])}`);
    $("output", row).textContent = fmt(mu[i]);
  });
}

// ----- start-up -----

async function connect() {
  clearError();
  try {
    state.info = await getJson("v1/objectives");
  } catch (err) {
    $("#model").textContent = "not connected";
    $("#front-note").textContent = "";
    showError(err);
    if (err.status === 401) $("#token").focus();
    return;
  }
  const info = state.info;
  const n = info.n_objectives;
  $("#model").textContent = `serving ${info.model} · objectives: ${info.objectives.join(", ")}`;
  state.mu.a = Array(n).fill(1 / n);
  state.mu.b = Array.from({ length: n }, (_, i) => (i === 0 ? 0.8 : 0.2 / (n - 1)));
  buildSliders("a");
  buildSliders("b");
  const method = $("#method");
  method.replaceChildren(...info.methods.map((m) => el("option", { value: m }, m)));
  method.value = info.defaults.method;
  $("#gamma").value = info.defaults.gamma;
  $("#max-tokens").value = info.defaults.max_tokens;
  $("#max-tokens").max = info.limits.max_tokens;
  for (const [id, k] of [
    ["#fx", 0],
    ["#fy", 1],
  ]) {
    $(id).replaceChildren(...info.objectives.map((o, i) => el("option", { value: String(i) }, o)));
    $(id).value = String(k);
  }
  $("#axes").hidden = n <= 2;
  $("#generate").disabled = false;
  try {
    state.front = await getJson("v1/front");
  } catch (err) {
    state.front = { available: false, reason: err.message };
    showError(err);
  }
  drawFront();
}

// ----- generation (SSE over fetch) -----

function requestBody(which) {
  const body = {
    prompt: $("#prompt").value,
    preference: state.mu[which],
    method: $("#method").value,
    score: $("#score").checked,
    stream: true,
  };
  const gamma = $("#gamma").value.trim();
  if (gamma !== "") body.gamma = Number(gamma);
  const maxTokens = $("#max-tokens").value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

/** POST v1/generate with stream=true; onDelta(text) per chunk; resolves to the final event. */
async function streamGenerate(body, onDelta, signal) {
  const resp = await fetch("v1/generate", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!resp.ok) throw await apiError(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let final = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return final;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return final;
        const ev = JSON.parse(data);
        if ("finish_reason" in ev) final = ev;
        else onDelta(ev.text);
      }
    }
  }
}

function showScores(panel, scores) {
  const table = $(".scores", panel);
  const rows = state.info.objectives.map((name, i) => {
    const tr = el("tr");
    tr.append(el("th", { scope: "row" }, name), el("td", {}, fmt(scores[i], 3)));
    return tr;
  });
  $("tbody", table).replaceChildren(...rows);
  table.hidden = false;
}

async function runOne(which, signal) {
  const panel = $(`#out-${which}`);
  const text = $(".text", panel);
  const meta = $(".meta", panel);
  const body = requestBody(which);
  text.textContent = "";
  $(".scores", panel).hidden = true;
  $(".pref-text", panel).textContent = prefLabel(state.mu[which]);
  state.scores[which] = null;
  panel.dataset.state = "streaming";
  panel.setAttribute("aria-busy", "true");
  meta.textContent = "waiting for the first token…";
  try {
    const final = await streamGenerate(
      body,
      (delta) => {
        text.textContent += delta;
        meta.textContent = "streaming…";
      },
      signal,
    );
    if (!final) throw new Error("the stream ended without its final event");
    if (final.error) throw new Error(final.error);
    const gamma = final.gamma === undefined ? "" : ` · γ ${final.gamma}`;
    meta.textContent = `finished (${final.finish_reason}) · ${final.usage.completion_tokens} tokens · ${final.method}${gamma}`;
    if (final.scores) {
      state.scores[which] = final.scores;
      showScores(panel, final.scores);
    }
    panel.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      panel.dataset.state = "stopped";
      meta.textContent = "stopped";
    } else {
      panel.dataset.state = "error";
      meta.textContent = "failed: see the message at the top";
      showError(err, shown().length > 1 ? which : undefined);
    }
  } finally {
    panel.removeAttribute("aria-busy");
  }
}

async function generate(ev) {
  if (ev) ev.preventDefault();
  if (state.controller || !state.info) return;
  clearError();
  state.controller = new AbortController();
  $("#generate").disabled = true;
  $("#stop").disabled = false;
  try {
    await Promise.all(shown().map((w) => runOne(w, state.controller.signal)));
  } finally {
    state.controller = null;
    $("#generate").disabled = false;
    $("#stop").disabled = true;
    drawFront();
  }
}

// ----- the Pareto front (inline SVG) -----

function nearest(points, mu) {
  let best = -1;
  let bestD = Infinity;
  points.forEach((p, k) => {
    const d = p.reduce((s, v, j) => s + (v - mu[j]) ** 2, 0);
    if (d < bestD) [best, bestD] = [k, d];
  });
  return best;
}

function extent(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-9) [lo, hi] = [lo - 0.5, hi + 0.5];
  const pad = (hi - lo) * 0.06;
  return [lo - pad, hi + pad];
}

function drawFront() {
  const f = state.front;
  const plot = $("#front-plot");
  const note = $("#front-note");
  if (!f || !state.info) return;
  if (!f.available) {
    plot.toggleAttribute("hidden", true); // an SVG element has no .hidden property
    $("#axes").hidden = true;
    note.textContent = `No front for this bundle: ${f.reason}`;
    return;
  }
  const x = Number($("#fx").value || 0);
  const y = Number($("#fy").value || 1);
  const method = $("#method").value;
  const sel = f.methods[method];
  const has = (r) => r && r[x] !== null && r[y] !== null;
  const xs = [];
  const ys = [];
  const add = (r) => {
    if (!has(r)) return;
    xs.push(r[x]);
    ys.push(r[y]);
  };
  Object.values(f.methods).forEach((m) => m.rewards.forEach(add));
  shown().forEach((w) => add(state.scores[w]));
  if (!xs.length) {
    plot.toggleAttribute("hidden", true);
    note.textContent = `No front for this bundle: the report (${f.source}) has no finite rewards.`;
    return;
  }
  const [W, H, L, R, T, B] = [460, 340, 56, 16, 14, 46];
  const [x0, x1] = extent(xs);
  const [y0, y1] = extent(ys);
  const sx = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const sy = (v) => H - B - ((v - y0) / (y1 - y0)) * (H - T - B);
  const names = f.objectives;
  plot.replaceChildren();
  plot.append(
    svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svgEl(
      "text",
      { class: "axis-label", x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle" },
      `${names[x]} →`,
    ),
    svgEl(
      "text",
      {
        class: "axis-label",
        x: 14,
        y: (T + H - B) / 2,
        "text-anchor": "middle",
        transform: `rotate(-90 14 ${(T + H - B) / 2})`,
      },
      `${names[y]} →`,
    ),
  );
  for (const t of [0, 0.5, 1]) {
    const vx = x0 + t * (x1 - x0);
    const vy = y0 + t * (y1 - y0);
    plot.append(
      svgEl("text", { x: sx(vx), y: H - B + 15, "text-anchor": "middle" }, vx.toPrecision(3)),
      svgEl("text", { x: L - 5, y: sy(vy) + 4, "text-anchor": "end" }, vy.toPrecision(3)),
    );
  }
  const title = (node, text) => {
    node.append(svgEl("title", {}, text)); // the tooltip (and accessible name) of a mark
    return node;
  };
  for (const [m, entry] of Object.entries(f.methods)) {
    if (m === method) continue;
    entry.rewards.forEach((r, k) => {
      if (has(r)) {
        plot.append(
          title(
            svgEl("circle", { class: "other", cx: sx(r[x]), cy: sy(r[y]), r: 3 }),
            `${m} ${prefLabel(f.preferences[k])}`,
          ),
        );
      }
    });
  }
  let text;
  if (sel) {
    if (names.length === 2) {
      // the front as a line; with more objectives a 2-D view of it is no line, so points only
      const onFront = sel.rewards.map((r, k) => [r, k]).filter(([r, k]) => has(r) && sel.front[k]);
      onFront.sort((a, b) => a[0][x] - b[0][x]);
      const points = onFront.map(([r]) => `${sx(r[x])},${sy(r[y])}`).join(" ");
      plot.append(svgEl("polyline", { class: "front-line", points }));
    }
    sel.rewards.forEach((r, k) => {
      if (!has(r)) return;
      const c = svgEl("circle", {
        class: `point ${sel.front[k] ? "on-front" : "dominated"}`,
        cx: sx(r[x]),
        cy: sy(r[y]),
        r: 4.5,
        "data-preference": f.preferences[k].join(","),
      });
      const where = names.map((o, j) => `${o} ${fmt(r[j], 3)}`).join(", ");
      plot.append(
        title(
          c,
          `${method} at preference ${prefLabel(f.preferences[k])}: ${where}${sel.front[k] ? " (on the front)" : ""}`,
        ),
      );
    });
    for (const w of shown()) {
      const k = nearest(f.preferences, state.mu[w]);
      const r = sel.rewards[k];
      if (k < 0 || !has(r)) continue;
      plot.append(
        title(
          svgEl("circle", {
            class: `current ${w}`,
            cx: sx(r[x]),
            cy: sy(r[y]),
            r: 9,
            "data-preference": f.preferences[k].join(","),
          }),
          `grid point nearest preference ${w.toUpperCase()}: ${prefLabel(f.preferences[k])}`,
        ),
        svgEl("text", { class: `mark-label ${w}`, x: sx(r[x]) + 11, y: sy(r[y]) - 7 }, w.toUpperCase()),
      );
    }
    const hv = sel.hv === null ? "" : `, hypervolume ${fmt(sel.hv, 3)}`;
    text =
      `${method}: ${f.preferences.length} preferences of the evaluation report (${f.source})${hv}. ` +
      "Filled = on the front, hollow = dominated, grey = the report's other methods; " +
      "ring = the report's preference nearest the slider's.";
  } else {
    text = `Method ${method} is not in the evaluation report (it has ${Object.keys(f.methods).join(", ")}): grey = those methods.`;
  }
  let scored = false;
  for (const w of shown()) {
    const s = state.scores[w];
    if (!has(s)) continue;
    scored = true;
    const [cx, cy] = [sx(s[x]), sy(s[y])];
    plot.append(
      title(
        svgEl("rect", {
          class: `scored ${w}`,
          x: cx - 5,
          y: cy - 5,
          width: 10,
          height: 10,
          transform: `rotate(45 ${cx} ${cy})`,
        }),
        `scores of text ${w.toUpperCase()}: ${names.map((o, j) => `${o} ${fmt(s[j], 3)}`).join(", ")}`,
      ),
      svgEl(
        "text",
        { class: `mark-label ${w}`, x: cx - 9, y: cy + 4, "text-anchor": "end" },
        w.toUpperCase(),
      ),
    );
  }
  if (scored)
    text +=
      " Diamond = the scores of the text just generated (one prompt, so noisier than the report's means).";
  note.textContent = text;
  plot.toggleAttribute("hidden", false);
}

// ----- wiring -----

document.addEventListener("DOMContentLoaded", () => {
  $("#token").value = token();
  $("#auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("#token").value.trim();
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    else sessionStorage.removeItem(TOKEN_KEY);
    connect();
  });
  $("#gen-form").addEventListener("submit", generate);
  $("#prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) generate(ev);
  });
  $("#stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("#compare").addEventListener("change", () => {
    const on = $("#compare").checked;
    $("#pref-b").hidden = !on;
    $("#out-b").hidden = !on;
    drawFront();
  });
  for (const id of ["#method", "#fx", "#fy"]) $(id).addEventListener("change", drawFront);
  connect();
});
