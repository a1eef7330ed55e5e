// The routing explorer: plain DOM and SVG over the service's /v1 JSON routes (no build step, no library).
// The API key lives in `state.key` only (never in storage or the URL) and goes out as the API expects it:
// Authorization: Bearer <key>.
"use strict";

const REFRESH_MS = 2000;
// Categorical colours for experts, distinguishable side by side; more experts than colours get spread hues.
const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac", "#1b9e77", "#7570b3"];
const SVG = "http://www.w3.org/2000/svg";

const state = { key: null, model: null, info: null, result: null, experts: null, busy: false };
const $ = (id) => document.getElementById(id);

function expertColour(e) {
  if (e < PALETTE.length) return PALETTE[e];
  return `hsl(${Math.round((e * 137.508) % 360)}, 55%, 55%)`;
}

function inkFor(colour) {
  // Black or white text, whichever reads better on the colour (hsl colours are mid-light: black).
  if (!colour.startsWith("#")) return "#000";
  const [r, g, b] = [1, 3, 5].map((i) => parseInt(colour.slice(i, i + 2), 16) / 255);
  return 0.299 * r + 0.587 * g + 0.114 * b > 0.6 ? "#000" : "#fff";
}

function heatColour(v) {
  // 0 -> near white, 1 -> deep blue (v is a share already scaled to the map's maximum).
  const t = Math.max(0, Math.min(1, v));
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return `rgb(${mix(247, 8)}, ${mix(251, 48)}, ${mix(255, 107)})`;
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(message, isError = false) {
  $("status").textContent = message;
  $("status").className = isError ? "error" : "";
}

async function api(path, body) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) {
    const hint = response.status === 401 ? " Enter the API key above." : "";
    const error = new Error(`${data.error || response.statusText}${hint}`);
    error.status = response.status;
    throw error;
  }
  return data;
}

// --- models -------------------------------------------------------------------------------------------------

async function loadModels() {
  try {
    const data = await api("/v1/models");
    const select = $("model");
    select.replaceChildren();
    for (const m of data.models) {
      const option = el("option", { value: m.name }, m.status === "ready" ? m.name : `${m.name} (${m.status})`);
      option.disabled = m.status !== "ready";
      select.append(option);
    }
    select.value = state.model && data.models.some((m) => m.name === state.model) ? state.model : data.default_model;
    say(`${data.models.length} model(s); the default is ${data.default_model}.`);
    await selectModel(select.value);
  } catch (error) {
    say(error.message, true);
  }
}

async function selectModel(name) {
  state.model = name;
  state.result = null;
  $("result").hidden = true;
  $("model-name").textContent = name;
  state.info = await api(`/v1/models/${encodeURIComponent(name)}/experts`);
  renderTrainingProfile();
  renderClassLayers();
  await refreshRouting();
}

// --- classify -----------------------------------------------------------------------------------------------

async function classify(event) {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim()) {
    say("Type a text first.", true);
    return;
  }
  try {
    $("classify").disabled = true;
    const data = await api("/v1/classify", { model: state.model, inputs: [text], return_routing: true });
    state.result = data.predictions[0];
    const p = state.result;
    say(`${p.label} (${(p.score * 100).toFixed(1)}%), ${p.tokens} tokens${p.truncated ? ", truncated" : ""}.`);
    renderResult();
    await refreshRouting();
  } catch (error) {
    say(error.message, true);
  } finally {
    $("classify").disabled = false;
  }
}

function renderResult() {
  const p = state.result;
  $("result").hidden = false;
  $("labels").replaceChildren(...p.scores.map(scoreRow));
  const view = $("layer-view");
  const chosen = view.value;
  view.replaceChildren(...p.routing.layers.map((l) => el("option", { value: String(l.layer) }, `layer ${l.layer}`)));
  view.append(el("option", { value: "all" }, "all layers (grid)"));
  view.value = [...view.options].some((o) => o.value === chosen) ? chosen : "0";
  renderLegend();
  renderTokens();
}

function scoreRow(s) {
  const row = el("div", { class: "score-row", "data-label": s.label });
  const bar = el("div", { class: "bar" });
  bar.append(el("span", { style: `width: ${(s.score * 100).toFixed(2)}%` }));
  row.append(el("span", {}, s.label), bar, el("span", { class: "value" }, s.score.toFixed(3)));
  return row;
}

function renderLegend() {
  const n = state.info.num_experts;
  const items = [];
  for (let e = 0; e < n; e++) {
    const colour = expertColour(e);
    items.push(el("span", { "data-expert": e, style: `background: ${colour}; color: ${inkFor(colour)}` }, `E${e}`));
  }
  $("legend").replaceChildren(...items);
}

function gateText(layer, i) {
  const parts = layer.experts[i].map((e, j) => `expert ${e} (${layer.gates[i][j].toFixed(3)})`);
  return `layer ${layer.layer}: ${parts.join(", ")}`;
}

function renderTokens() {
  const { tokens, layers } = state.result.routing;
  const view = $("layer-view").value;
  const box = $("tokens");
  box.className = view === "all" ? "grid" : "";
  box.replaceChildren(...tokens.map((t, i) => (view === "all" ? tokenColumn(t, i, layers) : tokenChip(t, i, layers[+view]))));
  $("token-detail").replaceChildren();
}

function tokenChip(text, i, layer) {
  const [first, second] = layer.experts[i];
  const colour = expertColour(first);
  const chip = el("span", { class: "token", "data-token": i, "data-expert": first, title: gateText(layer, i) }, text);
  chip.style.background = colour;
  chip.style.color = inkFor(colour);
  if (second !== undefined) chip.style.borderBottomColor = expertColour(second);
  return chip;
}

function tokenColumn(text, i, layers) {
  const column = el("div", { class: "column", "data-token": i, title: layers.map((l) => gateText(l, i)).join("\n") });
  for (const layer of layers) {
    const e = layer.experts[i][0];
    const cell = el("div", { class: "cell", "data-layer": layer.layer, "data-expert": e });
    cell.style.background = expertColour(e);
    column.append(cell);
  }
  column.append(el("span", { class: "word" }, text));
  return column;
}

function showDetail(event) {
  const target = event.target.closest("[data-token]");
  if (!target || !state.result) return;
  const i = +target.dataset.token;
  const { tokens, layers } = state.result.routing;
  document.querySelectorAll("#tokens .selected").forEach((n) => n.classList.remove("selected"));
  target.classList.add("selected");
  const table = el("table");
  table.append(el("caption", {}, `token ${i}: “${tokens[i]}”`));
  for (const layer of layers) {
    const row = el("tr");
    row.append(el("th", {}, `layer ${layer.layer}`));
    layer.experts[i].forEach((e, j) => row.append(el("td", {}, `expert ${e}: gate ${layer.gates[i][j].toFixed(3)}`)));
    table.append(row);
  }
  $("token-detail").replaceChildren(table);
}

// --- heatmaps -----------------------------------------------------------------------------------------------

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// rows x cols of values in [0, 1]; `label(r, c)` is the cell's tooltip, `show(v)` the text drawn in it.
function heatmap(container, rowNames, colNames, values, label, show) {
  const left = 8 + 7 * Math.max(...rowNames.map((r) => r.length)), top = 18, cw = 44, ch = 24;
  const width = left + cw * colNames.length, height = top + ch * rowNames.length;
  const max = Math.max(1e-9, ...values.flat());
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  colNames.forEach((c, j) => {
    const t = svg("text", { x: left + cw * j + cw / 2, y: 12, "text-anchor": "middle" });
    t.textContent = c;
    root.append(t);
  });
  rowNames.forEach((r, i) => {
    const t = svg("text", { x: 4, y: top + ch * i + ch / 2 + 4 });
    t.textContent = r;
    root.append(t);
    colNames.forEach((_, j) => root.append(...heatCell(left + cw * j, top + ch * i, cw, ch, values[i][j], max,
      label(i, j), show, { "data-row": i, "data-col": j })));
  });
  container.replaceChildren(root);
}

function heatCell(x, y, w, h, v, max, tip, show, data) {
  const rect = svg("rect", { x, y, width: w - 2, height: h - 2, fill: heatColour(v / max), class: "cell",
    "data-value": v, ...data });
  const title = svg("title", {});
  title.textContent = tip;
  rect.append(title);
  const text = svg("text", { x: x + w / 2 - 1, y: y + h / 2 + 3, "text-anchor": "middle",
    fill: v / max > 0.55 ? "#fff" : "#1d2329" });
  text.textContent = show(v);
  return [rect, text];
}

const pct = (v) => (v > 0 ? `${Math.round(v * 100)}` : "·");
const expertNames = (n) => Array.from({ length: n }, (_, e) => `E${e}`);
const layerNames = (layers) => layers.map((l) => `layer ${l.layer}`);

function loadHeatmap(container, layers) {
  const values = layers.map((l) => l.share);
  if (!layers.some((l) => l.assignments > 0)) {
    container.replaceChildren(el("p", { class: "empty" }, "no tokens routed yet"));
    return;
  }
  heatmap(container, layerNames(layers), expertNames(state.info.num_experts), values,
    (i, j) => `layer ${layers[i].layer}, expert ${j}: ${layers[i].tokens_per_expert[j]} assignments ` +
      `(${(layers[i].share[j] * 100).toFixed(1)}%)`, pct);
}

function renderTrainingProfile() {
  const box = $("heat-training");
  const layers = state.info.layers.filter((l) => l.training_share);
  if (!layers.length) {
    box.replaceChildren(el("p", { class: "empty" }, "this model folder has no routing_profile.json"));
    return;
  }
  heatmap(box, layerNames(layers), expertNames(state.info.num_experts), layers.map((l) => l.training_share),
    (i, j) => `layer ${layers[i].layer}, expert ${j}: ${(layers[i].training_share[j] * 100).toFixed(1)}%`, pct);
}

function renderClassLayers() {
  const select = $("class-layer");
  const layers = state.info.layers.filter((l) => l.class_share);
  select.replaceChildren(...layers.map((l) => el("option", { value: String(l.layer) }, `layer ${l.layer}`)));
  renderClasses();
}

function renderClasses() {
  const box = $("heat-classes");
  const layer = state.info.layers.find((l) => String(l.layer) === $("class-layer").value);
  if (!layer || !layer.class_share) {
    box.replaceChildren(el("p", { class: "empty" }, "this model folder has no eval.json with expert_by_class"));
    return;
  }
  const labels = Object.keys(layer.class_share);
  const top = (j) => layer.experts[j].top_classes.map((c) => `${c.label} ${(c.share * 100).toFixed(0)}%`).join(", ");
  heatmap(box, labels, expertNames(state.info.num_experts), labels.map((c) => layer.class_share[c]),
    (i, j) => `${labels[i]}: ${(layer.class_share[labels[i]][j] * 100).toFixed(1)}% of its assignments go to ` +
      `expert ${j}; expert ${j} is used most by ${top(j)}`, pct);
}

function renderStats(routing) {
  const fmt = (v, d = 2) => (v === null || v === undefined ? "–" : v.toFixed(d));
  const head = el("tr");
  ["layer", "imbalance (max/mean)", "in window", "unused experts", "in window", "drift KL", "in window"].forEach((h) =>
    head.append(el("th", {}, h)));
  const rows = routing.since_start.layers.map((total, i) => {
    const recent = routing.window.layers[i];
    const cells = [`${total.layer}`, fmt(total.imbalance_max_over_mean), fmt(recent.imbalance_max_over_mean),
      total.unused_experts.join(" ") || "none", recent.unused_experts.join(" ") || "none",
      fmt(total.drift_kl, 4), fmt(recent.drift_kl, 4)];
    const row = el("tr", { "data-layer": total.layer });
    cells.forEach((c) => row.append(el("td", {}, c)));
    return row;
  });
  $("layer-stats").replaceChildren(head, ...rows);
}

async function refreshRouting() {
  if (!state.model || state.busy) return;
  state.busy = true;
  try {
    const routing = await api(`/v1/models/${encodeURIComponent(state.model)}/routing`);
    loadHeatmap($("heat-total"), routing.since_start.layers);
    loadHeatmap($("heat-window"), routing.window.layers);
    renderStats(routing);
    $("routing-summary").textContent = `${routing.since_start.texts} texts since start; ` +
      `window ${routing.window.seconds} s; refreshed every ${REFRESH_MS / 1000} s`;
  } catch (error) {
    say(error.message, true);
  } finally {
    state.busy = false;
  }
}

// --- wiring -------------------------------------------------------------------------------------------------

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim() || null;
  loadModels();
});
$("classify-form").addEventListener("submit", classify);
$("model").addEventListener("change", (event) => selectModel(event.target.value).catch((e) => say(e.message, true)));
$("layer-view").addEventListener("change", renderTokens);
$("class-layer").addEventListener("change", renderClasses);
$("tokens").addEventListener("mouseover", showDetail);
$("tokens").addEventListener("click", showDetail);
setInterval(() => {
  if ($("live").checked && document.visibilityState === "visible") refreshRouting();
}, REFRESH_MS);
loadModels();
