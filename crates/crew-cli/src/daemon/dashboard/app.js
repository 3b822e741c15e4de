// The crew dashboard: the daemon's API (docs/api.md) drawn, live through
// its event stream. No library, no CDN: everything it needs is this file.
// The bearer token comes in the URL's fragment (never sent to a server),
// is kept for this tab only, and goes in the Authorization header of every
// request; values from jobs are only ever set as text, never as HTML.
"use strict";

const token = (() => {
  const hash = new URLSearchParams(location.hash.slice(1));
  const fromHash = hash.get("token");
  if (fromHash) {
    sessionStorage.setItem("crew-token", fromHash);
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("crew-token") || "";
})();

const $ = (id) => document.getElementById(id);

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(path + ": " + message);
  }
  return r.json();
}

function showError(e) {
  const p = $("error");
  p.textContent = e ? String(e.message || e) : "";
  p.hidden = !e;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function time(t) {
  return t ? new Date(t).toLocaleTimeString() : "-";
}

// ---- the state, read whole and redrawn ----------------------------------

let jobs = [];

async function loadJobs() {
  const all = [];
  let after = 0;
  for (let page = 0; page < 20; page++) {
    const list = await api("/v1/jobs?limit=1000&after=" + after);
    all.push(...list.jobs);
    if (list.next === null || list.next === undefined) break;
    after = list.next;
  }
  jobs = all;
}

function drawSlots(status) {
  const running = new Map();
  for (const j of jobs) {
    if (j.state === "running" && j.slot) running.set(j.slot, j);
  }
  const body = $("slots").tBodies[0];
  body.replaceChildren();
  for (const s of status.slots) {
    const row = body.insertRow();
    row.dataset.slot = s.name;
    row.dataset.state = s.state;
    cell(row, s.name);
    cell(row, s.class);
    cell(row, (s.tags || []).join(",") || "-");
    cell(row, s.state, "state-" + s.state);
    cell(row, s.handle);
    const job = running.get(s.name);
    cell(row, job ? job.id + (job.name ? " (" + job.name + ")" : "") : "-");
    cell(row, s.jobs_done);
    cell(row, s.last_reason);
  }
}

function drawJobs() {
  const want = $("state-filter").value;
  const text = $("text-filter").value.trim().toLowerCase();
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  const shown = jobs
    .filter((j) => !want || j.state === want)
    .filter((j) => !text || String(j.id) === text || (j.name || "").toLowerCase().includes(text))
    .slice(-500)
    .reverse();
  for (const j of shown) {
    const row = body.insertRow();
    row.dataset.id = j.id;
    row.dataset.state = j.state;
    cell(row, j.id);
    cell(row, j.name);
    cell(row, j.state, "state-" + j.state);
    cell(row, j.status, j.status ? "status-" + j.status : "");
    cell(row, j.slot);
    cell(row, j.attempt);
    cell(row, time(j.sent));
    cell(row, time(j.finished));
    row.addEventListener("click", () => showJob(j.id));
  }
}

async function refresh() {
  try {
    const status = await api("/v1/status");
    await loadJobs();
    $("dir").textContent = status.dir;
    $("queued").textContent = status.jobs.queued;
    $("running").textContent = status.jobs.running;
    $("ready").textContent = status.jobs.ready;
    drawSlots(status);
    drawJobs();
    backfill();
    drawPlot();
    document.body.dataset.loaded = String(Date.now());
    showError(null);
  } catch (e) {
    showError(e);
  }
}

let pending = null;
function refreshSoon() {
  if (pending === null) pending = setTimeout(() => { pending = null; refresh(); }, 250);
}

async function showJob(id) {
  try {
    const info = await api("/v1/jobs/" + id);
    $("detail").hidden = false;
    $("detail-id").textContent = id + (info.name ? " (" + info.name + ")" : "");
    $("detail-record").textContent = JSON.stringify(info.output || info, null, 2);
    $("detail-stdout").textContent = "";
    $("detail-stderr").textContent = "";
    if (info.output) {
      const logs = await api("/v1/jobs/" + id + "/logs");
      $("detail-stdout").textContent = logs.stdout;
      $("detail-stderr").textContent = logs.stderr;
    }
  } catch (e) {
    showError(e);
  }
}

// ---- throughput and latency, per second, from the event stream -----------

const seconds = new Map(); // second -> {ended, latencySum, latencyN}
const counted = new Set(); // job ids already in `seconds`

function count(id, atMs, latency) {
  if (counted.has(id)) return;
  counted.add(id);
  const s = Math.floor(atMs / 1000);
  const b = seconds.get(s) || { ended: 0, latencySum: 0, latencyN: 0 };
  b.ended += 1;
  if (typeof latency === "number" && latency >= 0) {
    b.latencySum += latency;
    b.latencyN += 1;
  }
  seconds.set(s, b);
}

function record(ev) {
  count(ev.id, Date.now(), ev.latency_seconds);
  drawPlot();
}

// Jobs that ended in the last minute before the page was loaded (or while
// the stream was down) count too, by their records' times.
function backfill() {
  const since = Date.now() - 60000;
  for (const j of jobs) {
    if (!j.finished) continue;
    const end = Date.parse(j.finished);
    if (end < since) continue;
    count(j.id, end, j.sent ? (end - Date.parse(j.sent)) / 1000 : null);
  }
}

function drawPlot() {
  const canvas = $("plot");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const now = Math.floor(Date.now() / 1000);
  const span = 60;
  const buckets = [];
  for (let i = span - 1; i >= 0; i--) buckets.push(seconds.get(now - i) || { ended: 0, latencySum: 0, latencyN: 0 });
  for (const k of seconds.keys()) if (k < now - span) seconds.delete(k);
  const maxEnded = Math.max(1, ...buckets.map((b) => b.ended));
  const lat = buckets.map((b) => (b.latencyN ? b.latencySum / b.latencyN : null));
  const maxLat = Math.max(0.001, ...lat.filter((x) => x !== null));
  const bw = (w - 2 * pad) / span;
  ctx.fillStyle = "#2f6fdd55";
  buckets.forEach((b, i) => {
    const bh = ((h - 2 * pad) * b.ended) / maxEnded;
    ctx.fillRect(pad + i * bw + 1, h - pad - bh, bw - 2, bh);
  });
  ctx.strokeStyle = "#c0392b";
  ctx.lineWidth = 2;
  ctx.beginPath();
  let started = false;
  lat.forEach((l, i) => {
    if (l === null) return;
    const x = pad + i * bw + bw / 2, y = h - pad - ((h - 2 * pad) * l) / maxLat;
    if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
  });
  ctx.stroke();
  ctx.fillStyle = "#6b7385";
  ctx.font = "11px system-ui";
  ctx.fillText("jobs/s (bars, max " + maxEnded + ")", pad, 14);
  ctx.fillText("latency (line, max " + maxLat.toFixed(3) + " s)", w / 2, 14);
  ctx.fillText("-60 s", pad, h - 8);
  ctx.fillText("now", w - pad - 20, h - 8);
  const last = buckets.slice(-10);
  const ended = last.reduce((a, b) => a + b.ended, 0);
  const n = last.reduce((a, b) => a + b.latencyN, 0);
  const sum = last.reduce((a, b) => a + b.latencySum, 0);
  $("rate").textContent = (ended / 10).toFixed(1);
  $("latency").textContent = n ? (sum / n).toFixed(3) + " s" : "-";
}

// ---- the event stream (fetch, since EventSource cannot send a token) -----

async function follow() {
  for (;;) {
    try {
      const r = await fetch("/v1/events", { headers: { Authorization: "Bearer " + token } });
      if (!r.ok || !r.body) throw new Error("/v1/events: " + r.status);
      $("live").className = "on";
      $("live").textContent = "live";
      refreshSoon();
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").find((l) => l.startsWith("data: "));
          if (!data) continue;
          const ev = JSON.parse(data.slice(6));
          if (ev.type === "job_ended") record(ev);
          refreshSoon();
        }
      }
    } catch (e) {
      showError(e);
    }
    $("live").className = "off";
    $("live").textContent = "offline";
    await new Promise((done) => setTimeout(done, 2000));
  }
}

$("state-filter").addEventListener("change", drawJobs);
$("text-filter").addEventListener("input", drawJobs);
setInterval(drawPlot, 1000);
refresh();
follow();
