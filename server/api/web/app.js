// The loraplex page: a playground (one prompt to several models, streamed side by side) and a
// live panel (GET /api/status once a second). Plain JS, no framework, no build step.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
let status = null;  // the last /api/status answer
let lastRate = null;  // {tokens, time} of the poll before, for tokens/s

// ---- tokens and requests --------------------------------------------------------------------

function token(kind) { return sessionStorage.getItem(kind + "-token") || ""; }

function headers(admin) {
  const t = admin ? token("admin") : (token("inference") || token("admin"));
  return t ? {"Authorization": "Bearer " + t} : {};
}

async function call(method, path, {admin = false, json, body} = {}) {
  const init = {method, headers: headers(admin)};
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  const response = await fetch(path, init);
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error?.message ?? JSON.stringify(body)}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function say(text) { $("message").textContent = text || ""; }

// ---- the live panel ---------------------------------------------------------------------------

async function poll() {
  try {
    status = await (await call("GET", "/api/status")).json();
    render(status);
    if ($("message").dataset.from === "poll") say("");
  } catch (error) {
    say("status: " + error.message + (error.message.startsWith("401")
      ? " (enter the inference token under tokens)" : ""));
    $("message").dataset.from = "poll";
  }
  setTimeout(poll, POLL_MS);
}

function render(s) {
  const m = s.model;
  $("model-line").textContent = `${m.name} · ${m.quantization} · ${m.device} · ` +
    `${m.max_slots} device slots, rank ≤ ${m.max_rank}`;
  document.body.classList.toggle("admin", s.admin_api && token("admin") !== "");
  $("running").textContent = s.requests.running;
  $("waiting").textContent = s.requests.waiting;
  $("kv-usage").textContent = Math.round(100 * s.kv_usage) + "%";
  if (lastRate && s.time > lastRate.time) {
    const rate = (s.generated_tokens - lastRate.tokens) / (s.time - lastRate.time);
    $("tokens-per-second").textContent = rate.toFixed(1);
  }
  lastRate = {tokens: s.generated_tokens, time: s.time};
  // Redrawn only when changed: a list replaced every second would swallow clicks on it.
  const admin = document.body.classList.contains("admin");
  whenChanged("tiers", [s.adapters, s.memory, admin], () => renderTiers(s));
  whenChanged("picks", [s.model.name, s.adapters], () => renderPicks(s));
  whenChanged("memory", [s.memory, s.cost], () => { renderMemory(s); renderChart(s.cost); });
}

const drawn = {};  // what each part of the page was last drawn from

function whenChanged(part, data, draw) {
  const key = JSON.stringify(data);
  if (drawn[part] !== key) {
    drawn[part] = key;
    draw();
  }
}

function renderTiers(s) {
  const byTier = {slot: [], host: [], store: []};
  for (const a of s.adapters) byTier[a.tier].push(a);
  for (const [tier, adapters] of Object.entries(byTier)) {
    $("tier-" + tier).replaceChildren(...adapters.map(adapterItem));
  }
  const mem = s.memory;
  $("slot-count").textContent = `${byTier.slot.length} of ${s.model.max_slots}`;
  $("host-count").textContent = `(all in host memory: ${bytes(mem.host_adapter_bytes)} of ${bytes(mem.host_adapter_limit_bytes)})`;
  $("store-count").textContent = `(${s.adapters.length} adapters stored in all, ${bytes(mem.store_bytes)})`;
}

function adapterItem(a) {
  const li = document.createElement("li");
  li.className = "adapter";
  Object.assign(li.dataset, {name: a.name, tier: a.tier, pinned: a.pinned, running: a.running});
  const busy = a.running || a.waiting ? ` · ${a.running} running, ${a.waiting} waiting` : "";
  li.innerHTML = `<b></b>${a.pinned ? ' <span class="pinned">pinned</span>' : ""}
    <span class="meta"></span> <span class="admin-only"></span>`;
  li.querySelector("b").textContent = a.name;
  li.querySelector(".meta").textContent = `v${a.version} · ${bytes(a.size_bytes)}${busy}` +
    (a.error ? " · " + a.error : "");
  const actions = li.querySelector(".admin-only");
  actions.append(
    button(a.pinned ? "unpin" : "pin", () => adapterAction("POST", `${a.name}/${a.pinned ? "unpin" : "pin"}`)),
    button("delete", () => confirm(`Delete adapter ${a.name}?`) && adapterAction("DELETE", a.name)));
  return li;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "small";
  b.textContent = label;
  b.dataset.action = label;
  b.addEventListener("click", onClick);
  return b;
}

async function adapterAction(method, path) {
  try {
    await call(method, "/api/admin/adapters/" + path, {admin: true});
    say("");
  } catch (error) {
    say("admin: " + error.message);
  }
}

async function upload(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("adapter_config", $("upload-config").files[0]);
  form.append("adapter_model", $("upload-weights").files[0]);
  try {
    const name = encodeURIComponent($("upload-name").value.trim());
    await call("PUT", "/api/admin/adapters/" + name, {admin: true, body: form});
    say("");
    $("upload").reset();
  } catch (error) {
    say("upload: " + error.message);
  }
}

// ---- memory: the cost explainer's figures and chart ------------------------------------------

function renderMemory(s) {
  const mem = s.memory, cost = s.cost, n = cost.adapters;
  const rows = [
    ["base model as served (" + s.model.quantization + ")", bytes(mem.base_model_bytes)],
    ["LoRA slot tables", bytes(mem.adapter_slot_bytes)],
    ["KV cache", bytes(mem.kv_cache_bytes)],
    ["adapters in host memory", bytes(mem.host_adapter_bytes)],
    [`loraplex: base + slot tables + ${n} adapters`, bytes(cost.loraplex_bytes)],
    [`${n} fine-tuned copies as served`, bytes(cost.served_copies_bytes) + ratio(cost.served_copies_bytes, cost.loraplex_bytes)],
    [`${n} fine-tuned copies in bfloat16`, bytes(cost.bf16_copies_bytes) + ratio(cost.bf16_copies_bytes, cost.loraplex_bytes)],
  ];
  $("memory").replaceChildren(...rows.map(([label, value]) => {
    const tr = document.createElement("tr");
    for (const text of [label, value]) tr.insertCell().textContent = text;
    return tr;
  }));
}

function ratio(copies, ours) { return ours ? ` (${(copies / ours).toFixed(1)}×)` : ""; }

const SVG = "http://www.w3.org/2000/svg";
const LINES = [  // as `loraplex cost` draws them
  {key: "loraplex", label: "loraplex: one base + N adapters", dash: ""},
  {key: "served_copies", label: "N fully fine-tuned copies (as served)", dash: "7 4"},
  {key: "bf16_copies", label: "N fully fine-tuned copies (bfloat16)", dash: "2 3"},
];
const COLORS = ["#2f6fde", "#f79009", "#12b76a"];

function renderChart(cost) {
  const svg = $("chart"), chart = cost.chart;
  svg.replaceChildren();
  if (!chart) {
    svgText(svg, 320, 180, "no adapters stored yet", "middle");
    return;
  }
  const box = {left: 76, right: 620, top: 16, bottom: 320};
  const all = LINES.flatMap((line) => chart[line.key]);
  const [yMin, yMax] = [Math.min(...all), Math.max(...all)].map(Math.log10);
  const xMax = Math.log10(chart.ns[chart.ns.length - 1]);
  const x = (n) => box.left + (box.right - box.left) * Math.log10(n) / xMax;
  const y = (b) => box.bottom - (box.bottom - box.top) * (Math.log10(b) - yMin) / (yMax - yMin);
  for (let e = 0; e <= xMax; e++) {
    svgLine(svg, x(10 ** e), box.top, x(10 ** e), box.bottom, "grid-line");
    svgText(svg, x(10 ** e), box.bottom + 14, String(10 ** e), "middle");
  }
  const MiB = 2 ** 20;  // memory ticks: 1, 10, 100, ... MiB
  for (let e = Math.ceil(yMin - Math.log10(MiB)); e <= yMax - Math.log10(MiB); e++) {
    const b = MiB * 10 ** e;
    svgLine(svg, box.left, y(b), box.right, y(b), "grid-line");
    svgText(svg, box.left - 4, y(b) + 4, `${(10 ** e).toLocaleString("en")} MiB`, "end");
  }
  svgText(svg, (box.left + box.right) / 2, box.bottom + 32, "number of adapters N (log scale)", "middle");
  LINES.forEach((line, i) => {
    const path = document.createElementNS(SVG, "polyline");
    path.setAttribute("points", chart.ns.map((n, j) => `${x(n)},${y(chart[line.key][j])}`).join(" "));
    Object.entries({fill: "none", stroke: COLORS[i], "stroke-width": 2, "stroke-dasharray": line.dash})
      .forEach(([k, v]) => path.setAttribute(k, v));
    svg.append(path);
    svgLine(svg, box.left + 12, box.top + 10 + 16 * i, box.left + 40, box.top + 10 + 16 * i, "", COLORS[i], line.dash);
    svgText(svg, box.left + 46, box.top + 14 + 16 * i, line.label, "start");
  });
  if (cost.adapters >= 1 && cost.adapters <= chart.ns[chart.ns.length - 1]) {  // where this server is
    svgLine(svg, x(cost.adapters), box.top, x(cost.adapters), box.bottom, "", "#98a2b3", "3 3");
    svgText(svg, x(cost.adapters) + 4, box.bottom - 6, `now: N = ${cost.adapters}`, "start");
  }
}

function svgLine(svg, x1, y1, x2, y2, cls, stroke = "", dash = "") {
  const line = document.createElementNS(SVG, "line");
  Object.entries({x1, y1, x2, y2}).forEach(([k, v]) => line.setAttribute(k, v));
  if (cls) line.setAttribute("class", cls);
  if (stroke) line.setAttribute("stroke", stroke);
  if (stroke) line.setAttribute("stroke-width", 2);
  if (dash) line.setAttribute("stroke-dasharray", dash);
  svg.append(line);
}

function svgText(svg, x, y, text, anchor) {
  const t = document.createElementNS(SVG, "text");
  Object.entries({x, y, "text-anchor": anchor}).forEach(([k, v]) => t.setAttribute(k, v));
  t.textContent = text;
  svg.append(t);
}

function bytes(n) {
  for (const [unit, scale] of [["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]]) {
    if (n >= scale) return `${(n / scale).toFixed(n >= 10 * scale ? 0 : 1)} ${unit}`;
  }
  return `${n} B`;
}

// ---- the playground ---------------------------------------------------------------------------

function renderPicks(s) {
  const names = [s.model.name, ...s.adapters.filter((a) => !a.error).map((a) => a.name)];
  const picks = $("model-picks");
  const shown = [...picks.querySelectorAll("input")].map((box) => box.value);
  if (shown.join("\n") === names.join("\n")) return;  // keep the user's ticks between polls
  const ticked = new Set(shown.length ? [...picks.querySelectorAll("input:checked")].map((b) => b.value) : names);
  picks.replaceChildren(...names.map((name, i) => {
    const label = document.createElement("label");
    const box = document.createElement("input");
    Object.assign(box, {type: "checkbox", value: name, checked: ticked.has(name) || !shown.includes(name)});
    label.append(box, " " + (i === 0 ? `${name} (base)` : name));
    return label;
  }));
}

function compare() {
  const prompt = $("prompt").value;
  const models = [...$("model-picks").querySelectorAll("input:checked")].map((box) => box.value);
  const maxTokens = Number($("max-tokens").value) || 64;
  if (!status || !prompt.trim() || !models.length) return;
  const chat = status.model.chat_template && !$("raw").checked;
  $("answers").replaceChildren(...models.map(answerCard));
  $("compare").disabled = true;
  Promise.allSettled(models.map((model) => streamAnswer(model, prompt, chat, maxTokens)))
    .finally(() => { $("compare").disabled = false; });
}

function answerCard(model) {
  const card = document.createElement("div");
  card.className = "answer";
  Object.assign(card.dataset, {model, state: "waiting"});
  card.innerHTML = `<h3><span class="name"></span><span class="stats">waiting…</span></h3>
    <div class="text"></div>`;
  card.querySelector(".name").textContent = model === status.model.name ? `${model} (base)` : model;
  return card;
}

// Streams one model's answer into its card: greedy, the same prompt for every model.
async function streamAnswer(model, prompt, chat, maxTokens) {
  const card = [...$("answers").children].find((c) => c.dataset.model === model);
  const text = card.querySelector(".text"), stats = card.querySelector(".stats");
  const body = {model, max_tokens: maxTokens, temperature: 0, stream: true,
                stream_options: {include_usage: true}};
  if (chat) body.messages = [{role: "user", content: prompt}];
  else body.prompt = prompt;
  const started = performance.now();
  let tokens = 0, finish = null, first = null;
  try {
    const response = await call("POST", chat ? "/v1/chat/completions" : "/v1/completions", {json: body});
    card.dataset.state = "streaming";
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices?.[0];
      if (choice) {
        text.textContent += chat ? (choice.delta?.content ?? "") : (choice.text ?? "");
        finish = choice.finish_reason ?? finish;
        tokens += 1;  // one chunk per step: the exact count comes with usage at the end
      }
      if (event.usage) tokens = event.usage.completion_tokens;
      first ??= performance.now();
      stats.textContent = answerStats(tokens, started, first, finish);
    }
    card.dataset.state = "done";
  } catch (error) {
    card.dataset.state = "error";
    text.textContent = error.message;
    stats.textContent = "failed";
  }
}

// "N tokens · first after T s · R tok/s · finish": R counts the tokens after the first.
function answerStats(tokens, started, first, finish) {
  const seconds = (performance.now() - first) / 1000;
  const rate = tokens > 1 && seconds > 0 ? ` · ${((tokens - 1) / seconds).toFixed(1)} tok/s` : "";
  return `${tokens} tokens · first after ${((first - started) / 1000).toFixed(2)} s${rate}` +
    (finish ? ` · ${finish}` : "");
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---- start ------------------------------------------------------------------------------------

function start() {
  for (const kind of ["inference", "admin"]) {
    const input = $(kind + "-token");
    input.value = token(kind);
    input.addEventListener("change", () => {
      sessionStorage.setItem(kind + "-token", input.value.trim());
      if (status) render(status);
    });
  }
  $("compare").addEventListener("click", compare);
  $("upload").addEventListener("submit", upload);
  poll();
}

start();
