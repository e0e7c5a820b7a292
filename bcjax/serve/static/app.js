"use strict";
// bcjax serve: one WebSocket; JSON text messages both ways, one binary message per generated block
// ([u32 header length][header JSON][images]); see bcjax/serve/protocol.py.
const $ = (id) => document.getElementById(id);
const S = {  // page state; window.bcjax for the console and the browser test
  model: null, stream: null, frames: [], fps: 16, lastDraw: 0, framesDrawn: 0, blocks: 0,
  arrivals: [], pendingSwitches: [], switches: {}, latencies: [], settings: null,
};
window.bcjax = S;
const canvas = $("video");
const ctx = canvas.getContext("2d");
let ws = null;

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

function connect() {
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { $("conn").textContent = "online"; $("conn").classList.add("on"); };
  ws.onclose = () => { $("conn").textContent = "offline"; $("conn").classList.remove("on"); };
  ws.onmessage = (ev) => (ev.data instanceof ArrayBuffer ? onBlock(ev.data) : onJson(JSON.parse(ev.data)));
}

function fill(select, values, chosen) {
  select.innerHTML = "";
  for (const v of values) select.add(new Option(v, v, false, v === chosen));
}

function onHello(msg) {
  const m = (S.model = msg.model);
  $("model").textContent = `${m.title} · ${m.kind === "toy" ? "sprite-phrase prompts" : "free-text prompts"}`;
  fill($("schedule"), msg.schedules, "P4");
  fill($("window"), msg.windows, "bidirectional");
  fill($("policy"), msg.policies, "no-recache");
  $("prompt").value = m.example;
  $("prompt-hint").textContent = m.vocabulary ? `colour direction speed${m.max_sprites > 1 ? ", …" : ""}` : "free text";
  const scale = Math.max(1, Math.floor(384 / Math.max(m.width, m.height)));
  canvas.width = m.width * (m.kind === "toy" ? scale : 1);
  canvas.height = m.height * (m.kind === "toy" ? scale : 1);
  canvas.style.width = `${canvas.width}px`;
  canvas.style.height = `${canvas.height}px`;
  ctx.imageSmoothingEnabled = m.kind !== "toy";
  const strip = $("strip");
  strip.innerHTML = "";
  for (const label of m.stages) {
    const cell = document.createElement("div");
    cell.className = "cell";
    cell.innerHTML = `<div class="lvl">${label}</div><div class="blk"></div>`;
    strip.appendChild(cell);
  }
  complete();
}

function clearView() {
  S.frames = []; S.arrivals = []; S.blocks = 0;
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (const id of ["bps", "fps-now", "step-ms", "latency", "where"]) $(id).textContent = "–";
  drawStrip([]);
}

function onJson(msg) {
  switch (msg.type) {
    case "hello": onHello(msg); break;
    case "state":
      $("state").textContent = msg.state + (msg.prompt ? ` · "${msg.prompt}"` : "");
      if (msg.state === "running" && msg.stream !== S.stream) {
        S.stream = msg.stream; S.settings = msg.settings; S.switches = {}; clearView();
      }
      if (msg.state === "idle") { S.stream = null; clearView(); }
      if (msg.state === "ended" && msg.stream === S.stream) S.stream = null;
      break;
    case "prompt": {  // a switch was accepted: it applies from the next block that enters
      const sent = S.pendingSwitches.shift();
      S.switches[msg.index] = { t: sent === undefined ? performance.now() : sent, prompt: msg.prompt };
      $("message").textContent = "";
      $("state").textContent = `switching to "${msg.prompt}" at the next block`;
      break;
    }
    case "error":
      if (msg.what === "prompt" && msg.for === "prompt") S.pendingSwitches.shift();
      $("message").textContent = msg.message;
      break;
    case "tick":
      if (msg.stream === S.stream) drawStrip(msg.stages);
      break;
  }
}

function onBlock(buf) {
  const n = new DataView(buf).getUint32(0);
  const h = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  if (h.stream !== S.stream) return;  // a stream this page has left
  let at = 4 + n;
  for (const size of h.sizes) {
    S.frames.push(createImageBitmap(new Blob([new Uint8Array(buf, at, size)], { type: h.mime })));
    at += size;
  }
  const now = performance.now();
  S.blocks += 1;
  S.arrivals.push(now);
  while (S.arrivals.length && now - S.arrivals[0] > 2000) S.arrivals.shift();
  if (S.arrivals.length > 1) {
    const bps = (S.arrivals.length - 1) / ((now - S.arrivals[0]) / 1000);
    $("bps").textContent = bps.toFixed(1);
    $("fps-now").textContent = (bps * h.sizes.length).toFixed(1);
  }
  $("step-ms").textContent = `${h.compute_ms.toFixed(1)} ms`;
  $("where").textContent = `block ${h.block} · prompt ${h.block_prompt}`;
  drawStrip(h.stages);
  const sw = S.switches[h.block_prompt];
  if (h.switch_ms !== undefined && sw && !sw.done) {
    sw.done = true;
    const ms = now - sw.t;
    S.latencies.push({ ms, server_ms: h.switch_ms, recache_ms: h.switch_recache_ms, ...S.settings });
    $("latency").textContent = `${ms.toFixed(0)} ms`;
    $("latency").title = `server ${h.switch_ms.toFixed(0)} ms, recache ${h.switch_recache_ms.toFixed(1)} ms`;
    const row = document.createElement("tr");
    const sched = S.settings.schedule === "sequential" ? "sequential" : `${S.settings.schedule} ${S.settings.window}`;
    for (const v of [sched, S.settings.policy, `${ms.toFixed(0)} ms`, `${h.switch_ms.toFixed(0)} ms`,
                     `${h.switch_recache_ms.toFixed(1)} ms`]) {
      const td = document.createElement("td"); td.textContent = v; row.appendChild(td);
    }
    $("switches").tBodies[0].prepend(row);
    $("state").textContent = `running · "${sw.prompt}"`;
  }
}

function hue(prompt) { return `hsl(${(prompt * 137 + 200) % 360}, 55%, 42%)`; }

function drawStrip(stages) {
  const cells = $("strip").children;
  for (let s = 0; s < cells.length; s++) {
    const here = stages.filter((x) => x[1] === s);
    const blk = cells[s].querySelector(".blk");
    blk.textContent = here.map((x) => x[0]).join(" ");
    blk.style.background = here.length ? hue(here[0][2]) : "transparent";
  }
}

async function drawLoop() {
  const now = performance.now();
  try {
    if (S.frames.length && (S.fps === 0 || now - S.lastDraw >= 1000 / S.fps)) {
      // unpaced, or fallen behind: show the newest frame
      if (S.fps === 0 || S.frames.length > 48) S.frames.splice(0, S.frames.length - 1);
      const bmp = await S.frames.shift();
      ctx.drawImage(bmp, 0, 0, canvas.width, canvas.height);
      S.framesDrawn += 1;
      S.lastDraw = now;
    }
  } catch (e) {
    $("message").textContent = `a frame could not be shown: ${e}`;
  } finally {
    setTimeout(drawLoop, 5);
  }
}

function complete() {  // toy world: complete the word being typed from the world's vocabulary
  const list = $("completions");
  list.innerHTML = "";
  const vocab = S.model && S.model.vocabulary;
  if (!vocab) return;
  const v = $("prompt").value;
  const cut = v.lastIndexOf(",") + 1;
  const words = v.slice(cut).trimStart().split(/\s+/);
  const partial = words.pop();
  if (words.length >= vocab.length) return;
  const prefix = v.slice(0, cut) + (cut ? " " : "") + words.map((w) => w + " ").join("");
  for (const w of vocab[words.length]) if (w.startsWith(partial)) list.appendChild(new Option(prefix + w));
}

function settings() {
  return { schedule: $("schedule").value, window: $("window").value, policy: $("policy").value,
           seed: Number($("seed").value) || 0, fps: Number($("fps").value) };
}

$("prompt").addEventListener("input", complete);
$("prompt-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  $("message").textContent = "";
  if (S.stream === null) { $("start").click(); return; }
  S.pendingSwitches.push(performance.now());
  send({ type: "prompt", prompt: $("prompt").value });
});
$("start").addEventListener("click", () => {
  $("message").textContent = "";
  send({ type: "start", prompt: $("prompt").value, ...settings() });
});
$("stop").addEventListener("click", () => send({ type: "stop" }));
$("reset").addEventListener("click", () => send({ type: "reset" }));
$("fps").addEventListener("change", () => { S.fps = Number($("fps").value); send({ type: "pace", fps: S.fps }); });
S.fps = Number($("fps").value);
connect();
drawLoop();
