"use strict";
// bcjax serve: one WebSocket; JSON text messages both ways, one binary message per generated block
// ([u32 header length][header JSON][images]); see bcjax/serve/protocol.py.
const $ = (id) => document.getElementById(id);
const S = {  // page state; window.bcjax for the console and the browser test
  model: null, stream: null, frames: [], fps: 16, lastDraw: 0, framesDrawn: 0, blocks: 0,
  arrivals: [], pendingSwitches: [], switches: {}, latencies: [], settings: null,
  phase: "idle", states: [], compilingSince: 0, compilingShown: [], received: 0, retries: 0, closedBy: 0,
};
window.bcjax = S;
const canvas = $("video");
const ctx = canvas.getContext("2d");
let ws = null;
let ackTimer = null;

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

const IDLE = 4000, NOT_READING = 4001;  // close codes of a tab the server ends (bcjax/serve/session.py)

function connect(then) {
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { $("conn").textContent = "online"; $("conn").classList.add("on"); if (then) then(); };
  ws.onclose = (ev) => {
    if (ev.code === IDLE || ev.code === NOT_READING) {  // closed on purpose: no retry until the user starts again
      S.closedBy = ev.code;
      $("conn").textContent = ev.code === IDLE ? "closed while idle · start reconnects" : "closed · start reconnects";
      $("conn").classList.remove("on");
      if (!$("message").textContent) $("message").textContent = ev.reason;
      if (S.stream !== null) { S.stream = null; setPhase("idle"); clearView(); }
      return;
    }
    // the server went away, restarted, or holds its maximum of tabs (1013): try again, ever slower
    const wait = Math.min(30, 2 ** Math.min(S.retries, 5));
    S.retries += 1;
    $("conn").textContent = `offline · retry in ${wait} s`;
    $("conn").classList.remove("on");
    if (S.stream !== null) { S.stream = null; setPhase("idle"); clearView(); }
    setTimeout(connect, wait * 1000);
  };
  ws.onmessage = (ev) => (ev.data instanceof ArrayBuffer ? onBlock(ev.data) : onJson(JSON.parse(ev.data)));
}

function fill(select, values, chosen) {
  const keep = select.value;
  select.innerHTML = "";
  for (const v of values) select.add(new Option(v, v, false, v === (values.includes(keep) ? keep : chosen)));
}

function setPhase(phase) {
  S.phase = phase;
  S.states.push(phase);
  if (phase === "compiling") S.compilingSince = performance.now();
}

function showCompiling() {  // the first start of a setting compiles its programs: seconds, not a black "running"
  if (S.phase !== "compiling") return;
  const text = `compiling… ${((performance.now() - S.compilingSince) / 1000).toFixed(0)} s (first use of this setting)`;
  $("state").textContent = text;
  if (S.compilingShown[S.compilingShown.length - 1] !== text) S.compilingShown.push(text);
}
setInterval(showCompiling, 250);

function ackSoon() {  // the server computes only while the page acknowledges what it received
  if (ackTimer !== null) return;
  ackTimer = setTimeout(() => {
    ackTimer = null;
    if (S.stream !== null) send({ type: "ack", stream: S.stream, blocks: S.received });
  }, 50);
}

function onHello(msg) {
  S.retries = 0;
  const m = (S.model = msg.model);
  $("model").textContent = `${m.title} · ${m.kind === "toy" ? "sprite-phrase prompts" : "free-text prompts"}`;
  fill($("stagger"), msg.staggers, msg.stagger || "P4");  // the server's default (`bcjax serve --stagger`)
  fill($("mask"), msg.masks, msg.mask);  // the server's default
  fill($("policy"), msg.policies, "no-recache");
  // the decoders this model has (the server's names); none: the control stays, disabled, with why
  fill($("decoder"), m.decoders, m.decoder);
  $("decoder").disabled = m.decoders.length === 0;
  $("decoder-note").textContent = m.decoder_note || "";
  $("decoder").title = m.decoder_note || "the pixel decoder of the next stream (start begins a new one)";
  $("decode-where").textContent = m.decode_device ? `(on ${m.decode_device})` : "";
  if (!$("prompt").value) $("prompt").value = m.example;
  $("prompt-hint").textContent = m.vocabulary ? `colour direction speed${m.max_sprites > 1 ? ", …" : ""}` : "free text";
  const scale = Math.max(1, Math.floor(384 / Math.max(m.width, m.height)));
  canvas.width = m.width * scale;  // a small video (the toy world, a tiny checkpoint) drawn larger
  canvas.height = m.height * scale;
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

const FIGURES = ["bps", "fps-now", "step-ms", "decode-ms", "latency-touched", "latency", "where"];

function clearFigures() {  // live figures only while blocks come: none left over from a stopped stream
  S.arrivals = [];
  for (const id of FIGURES) $(id).textContent = "–";
}

function clearView() {
  S.frames = []; S.blocks = 0; S.received = 0;
  clearFigures();
  $("compile").textContent = "–";
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  drawStrip([]);
}

function onJson(msg) {
  switch (msg.type) {
    case "hello": onHello(msg); break;
    case "state":
      $("state").textContent = msg.state + (msg.prompt ? ` · "${msg.prompt}"` : "") + (msg.resumed ? " (resumed)" : "");
      if (msg.state === "compiling") {  // a new stream: nothing of the old one stays on the page
        S.stream = msg.stream; S.settings = msg.settings; S.prompt = msg.prompt; S.switches = {}; clearView();
        setPhase("compiling"); showCompiling();
      }
      if (msg.state === "running" && msg.stream === S.stream) {
        if (msg.compile_ms !== undefined) {
          $("compile").textContent = msg.compile_ms > 1 ? `${(msg.compile_ms / 1000).toFixed(1)} s` : "none (compiled before)";
          $("state").textContent = `running · "${S.prompt}"`;
        }
        setPhase("running");
      }
      if (msg.state === "stopped") { setPhase("stopped"); clearFigures(); }
      if (msg.state === "idle") { S.stream = null; setPhase("idle"); clearView(); }
      if (msg.state === "ended" && msg.stream === S.stream) { S.stream = null; setPhase("ended"); clearFigures(); }
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
      $("message").title = msg.message;  // the line is clipped to its box (no layout shift); the whole text here
      break;
    case "tick":
      if (msg.stream === S.stream) drawStrip(msg.stages, msg.prompt);
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
  S.received += 1;
  ackSoon();
  S.blocks += 1;
  if (S.phase === "running") {  // blocks sent before a stop still arrive: they do not bring the figures back
    S.arrivals.push(now);
    while (S.arrivals.length && now - S.arrivals[0] > 2000) S.arrivals.shift();
    if (S.arrivals.length > 1) {
      const bps = (S.arrivals.length - 1) / ((now - S.arrivals[0]) / 1000);
      $("bps").textContent = bps.toFixed(1);
      $("fps-now").textContent = (bps * h.sizes.length).toFixed(1);
    }
    $("step-ms").textContent = `${h.compute_ms.toFixed(1)} ms`;
    // measured by the server around this block's decode on the decode device
    $("decode-ms").textContent = h.decode_ms === null ? "none (no VAE)" : `${h.decode_ms.toFixed(1)} ms · ${h.decoder}`;
    $("where").textContent = `block ${h.block} · prompt ${h.block_prompt}`;
  }
  drawStrip(h.stages, h.prompt);
  // a switch shows twice under a cascade: first in a block that had any pass under the new text
  // (every block in flight runs under the prompt in force), then in the first block that
  // started under it; one-time compiles (a recache program's first use) are left out of both
  const touched = S.switches[h.touched_prompt];
  if (h.touched_ms !== undefined && touched && touched.touchedMs === undefined) {
    touched.touchedMs = Math.max(0, now - touched.t - h.touched_compile_ms);
    $("latency-touched").textContent = `${touched.touchedMs.toFixed(0)} ms`;
  }
  const sw = S.switches[h.block_prompt];
  if (h.switch_ms !== undefined && sw && !sw.done) {
    sw.done = true;
    const ms = Math.max(0, now - sw.t - h.switch_compile_ms);
    const touchedMs = sw.touchedMs === undefined ? ms : sw.touchedMs;
    S.latencies.push({ ms, touched_ms: touchedMs, server_ms: h.switch_ms, recache_ms: h.switch_recache_ms,
                       compile_ms: h.switch_compile_ms, ...S.settings });
    $("latency").textContent = `${ms.toFixed(0)} ms`;
    $("latency").title = `server ${h.switch_ms.toFixed(0)} ms, recache ${h.switch_recache_ms.toFixed(1)} ms, ` +
      `one-time compile ${h.switch_compile_ms.toFixed(0)} ms (not counted)`;
    const row = document.createElement("tr");
    const run = S.settings.stagger === "sequential" ? "sequential" : `${S.settings.stagger} ${S.settings.mask}`;
    for (const v of [run, S.settings.policy, `${touchedMs.toFixed(0)} ms`, `${ms.toFixed(0)} ms`,
                     `${h.switch_recache_ms.toFixed(1)} ms`, `${h.switch_compile_ms.toFixed(0)} ms`]) {
      const td = document.createElement("td"); td.textContent = v; row.appendChild(td);
    }
    $("switches").tBodies[0].prepend(row);
    $("state").textContent = `running · "${sw.prompt}"`;
  }
}

function hue(prompt) { return `hsl(${(prompt * 137 + 200) % 360}, 55%, 42%)`; }

function drawStrip(stages, inForce) {
  // the frame: the prompt this tick runs under (every block in it); a block: the prompt it started under
  $("strip").style.borderColor = inForce === undefined ? "transparent" : hue(inForce);
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
  return { stagger: $("stagger").value, mask: $("mask").value, policy: $("policy").value,
           seed: Number($("seed").value) || 0, fps: Number($("fps").value),
           decoder: $("decoder").disabled ? null : $("decoder").value };
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
  const start = () => send({ type: "start", prompt: $("prompt").value, ...settings() });
  if (S.closedBy) { S.closedBy = 0; connect(start); } else start();  // after an idle close: a new connection
});
for (const id of ["stagger", "mask", "policy", "seed", "decoder"]) {  // a stopped stream resumes only unchanged
  $(id).addEventListener("change", () => { if (S.phase === "stopped") $("state").textContent = "stopped · start begins a new stream"; });
}
$("stop").addEventListener("click", () => send({ type: "stop" }));
$("reset").addEventListener("click", () => send({ type: "reset" }));
$("fps").addEventListener("change", () => { S.fps = Number($("fps").value); send({ type: "pace", fps: S.fps }); });
S.fps = Number($("fps").value);
connect();
drawLoop();
