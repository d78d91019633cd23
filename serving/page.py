"""The web page served at ``/``: plain HTML and JavaScript (no build step), embedded here so it
ships inside the package. Drop photos, type a prompt, see images (apprentice); start a DreamBooth
job, watch its progress live (its ``/v1/experts/{id}/events`` stream, read with ``fetch`` because
``EventSource`` cannot send the API key; a job's box records the events seen in
``data-events``), then generate from it. Every message appears next to the control that
caused it (``#key-status``, ``#generate-status``, ``#train-status``, a job's ``.job-status``).

``DOCS_PAGE`` (``/docs``) lists the API from ``/openapi.json`` without any asset from a CDN."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SuTI</title>
<style>
  [hidden] { display: none !important; }
  body { font-family: system-ui, sans-serif; max-width: 960px; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
  h1 { margin-bottom: .2rem; } h2 { margin-top: 1.6rem; font-size: 1.15rem; }
  .muted { color: #666; font-size: .9rem; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2rem; text-align: center; cursor: pointer; }
  #drop.over { background: #eef6ff; border-color: #3578e5; }
  .thumbs { display: flex; flex-wrap: wrap; gap: .5rem; margin-top: .6rem; }
  .thumb { position: relative; } .thumb img { width: 72px; height: 72px; object-fit: cover; border-radius: 4px; }
  .thumb button { position: absolute; top: -6px; right: -6px; border-radius: 50%; border: none; background: #c33; color: #fff; cursor: pointer; }
  .row { display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; margin: .4rem 0; }
  input[type=text] { flex: 1; min-width: 220px; padding: .35rem; } input[type=number] { width: 5rem; padding: .3rem; }
  button { padding: .35rem .8rem; cursor: pointer; }
  .images img { width: 160px; height: 160px; image-rendering: pixelated; margin: .25rem; border: 1px solid #ddd; border-radius: 4px; }
  .status { min-height: 1.3rem; margin: .3rem 0; } .status.error { color: #b00; font-weight: 600; }
  .job { border: 1px solid #ddd; border-radius: 6px; padding: .6rem; margin: .5rem 0; }
  .job progress { width: 200px; }
</style>
</head>
<body>
<h1>SuTI</h1>
<div class="muted">Subject-driven text-to-image: the apprentice generates from your photos at once; a DreamBooth expert trains on them in the background.</div>

<div class="row muted"><label>API key (if the server needs one) <input id="api-key" type="password" autocomplete="off"></label>
  <span id="key-status" class="status" role="status"></span></div>

<h2>1. Photos of your subject</h2>
<div id="drop">Drop 3&ndash;5 photos here, or click to choose<input id="files" type="file" accept="image/*" multiple hidden></div>
<div id="thumbs" class="thumbs"></div>
<div id="photo-count" class="muted">no photos</div>

<h2>2. Generate now (apprentice, no tuning)</h2>
<div class="row">
  <input id="prompt" type="text" placeholder="e.g. a photo of it on the beach" maxlength="300">
  <label>images <input id="num-images" type="number" min="1" max="4" value="1"></label>
  <label>steps <input id="steps" type="number" min="1" max="100" placeholder="default"></label>
  <button id="generate">Generate</button>
</div>
<div id="generate-status" class="status" role="status"></div>
<div id="results" class="images"></div>

<h2>3. Train a DreamBooth expert</h2>
<div class="row">
  <input id="class-noun" type="text" placeholder="class noun, e.g. dog" maxlength="40">
  <label>training steps <input id="train-steps" type="number" min="1" placeholder="recipe"></label>
  <button id="train">Train expert</button>
</div>
<div id="train-status" class="status" role="status"></div>
<div id="jobs"></div>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
let photos = [];
const watched = new Map();

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("suti-api-key") || "";
let keyTimer = null;
keyInput.addEventListener("input", () => {  // typing the key loads the job list, no reload needed
  localStorage.setItem("suti-api-key", keyInput.value);
  clearTimeout(keyTimer);
  keyTimer = setTimeout(loadJobs, 300);
});

function headers() {
  const key = keyInput.value.trim();
  return key ? { "X-API-Key": key } : {};
}

// Messages go next to what the user did: el is the status element of that control.
function say(el, text, error) {
  el.textContent = text;
  el.classList.toggle("error", !!error);
}

async function errorOf(resp) {
  try { const body = await resp.json(); return body.error || resp.statusText; }
  catch (e) { return resp.status + " " + resp.statusText; }
}

function addPhotos(files) {
  for (const f of files) if (f.type.startsWith("image/") || f.name) photos.push(f);
  photos = photos.slice(0, 8);
  renderPhotos();
}

function renderPhotos() {
  const box = $("thumbs");
  box.replaceChildren();
  photos.forEach((f, i) => {
    const div = document.createElement("div"); div.className = "thumb";
    const img = document.createElement("img"); img.src = URL.createObjectURL(f); img.alt = f.name;
    const rm = document.createElement("button"); rm.textContent = "\u00d7"; rm.title = "remove";
    rm.addEventListener("click", (e) => { e.stopPropagation(); photos.splice(i, 1); renderPhotos(); });
    div.append(img, rm); box.append(div);
  });
  $("photo-count").textContent = photos.length ? photos.length + " photo" + (photos.length > 1 ? "s" : "") : "no photos";
}

const drop = $("drop");
drop.addEventListener("click", () => $("files").click());
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addPhotos(e.dataTransfer.files); });
$("files").addEventListener("change", (e) => { addPhotos(e.target.files); e.target.value = ""; });

async function showImages(resp, box) {
  box.replaceChildren();
  const type = resp.headers.get("content-type") || "";
  let urls = [];
  if (type.startsWith("image/")) urls = [URL.createObjectURL(await resp.blob())];
  else urls = (await resp.json()).images.map((b) => "data:image/png;base64," + b);
  for (const url of urls) { const img = document.createElement("img"); img.src = url; img.alt = "generated image"; box.append(img); }
  return urls.length;
}

$("generate").addEventListener("click", async () => {
  const status = $("generate-status");
  if (!photos.length) return say(status, "add at least one photo first", true);
  const prompt = $("prompt").value.trim();
  if (!prompt) return say(status, "type a prompt first", true);
  const form = new FormData();
  photos.forEach((f) => form.append("images", f, f.name));
  form.append("prompt", prompt);
  form.append("num_images", $("num-images").value || "1");
  if ($("steps").value) form.append("steps", $("steps").value);
  say(status, "generating\u2026");
  $("generate").disabled = true;
  try {
    const resp = await fetch("/v1/generate", { method: "POST", body: form, headers: headers() });
    if (!resp.ok) return say(status, await errorOf(resp), true);
    const n = await showImages(resp, $("results"));
    say(status, "generated " + n + " image" + (n > 1 ? "s" : "") + " (seed " + resp.headers.get("x-seed") + ")");
  } catch (e) { say(status, "request failed: " + e, true); }
  finally { $("generate").disabled = false; }
});

$("train").addEventListener("click", async () => {
  const status = $("train-status");
  const noun = $("class-noun").value.trim();
  if (!noun) return say(status, "type the class noun of your subject (e.g. dog)", true);
  if (photos.length < 3 || photos.length > 5) return say(status, "a DreamBooth expert needs 3 to 5 photos (you have " + photos.length + ")", true);
  const form = new FormData();
  photos.forEach((f) => form.append("images", f, f.name));
  form.append("class_noun", noun);
  if ($("train-steps").value) form.append("steps", $("train-steps").value);
  try {
    const resp = await fetch("/v1/experts", { method: "POST", body: form, headers: headers() });
    if (!resp.ok) return say(status, await errorOf(resp), true);
    const job = await resp.json();
    say(status, "job " + job.id.slice(0, 8) + " queued (below)");
    watch(job.id);
  } catch (e) { say(status, "request failed: " + e, true); }
});

function jobBox(id) {
  let box = document.getElementById("job-" + id);
  if (box) return box;
  box = document.createElement("div"); box.className = "job"; box.id = "job-" + id; box.dataset.job = id;
  box.innerHTML =
    '<div class="row"><b class="title"></b> <span class="state"></span> <progress max="1" value="0"></progress> <span class="pct"></span> <span class="steps muted"></span>' +
    ' <button class="cancel">Cancel</button> <button class="delete">Delete</button></div>' +
    '<div class="row expert-generate" hidden><input type="text" class="expert-prompt" value="a {V} {class} on the beach" maxlength="300">' +
    ' <button class="expert-go">Generate with expert</button></div><div class="status job-status" role="status"></div>' +
    '<div class="images validation-image"></div><div class="images expert-results"></div>';
  box.querySelector(".cancel").addEventListener("click", () => cancel(id, box));
  box.querySelector(".delete").addEventListener("click", () => remove(id, box));
  box.querySelector(".expert-go").addEventListener("click", () => generateWithExpert(id, box));
  $("jobs").prepend(box);
  return box;
}

function renderJob(job) {
  const box = jobBox(job.id);
  box.querySelector(".title").textContent = job.class_noun + " (" + job.id.slice(0, 8) + ")";
  let state = job.status + (job.phase && job.status === "running" ? " \u2013 " + job.phase : "");
  if (job.status === "queued" && job.queue_position) state += " (position " + job.queue_position + ")";
  if (job.status === "failed" && job.error) state += ": " + job.error;
  box.querySelector(".state").textContent = state;
  box.dataset.status = job.status;
  showProgress(box, job.progress, job.step, job.total);
  box.querySelector(".cancel").hidden = !(job.status === "queued" || job.status === "running");
  box.querySelector(".delete").hidden = job.status === "queued" || job.status === "running";
  box.querySelector(".expert-generate").hidden = job.status !== "done";
}

function showProgress(box, progress, step, total) {
  box.querySelector("progress").value = progress || 0;
  box.querySelector(".pct").textContent = Math.round((progress || 0) * 100) + "%";
  box.querySelector(".steps").textContent = total ? "step " + step + "/" + total : "";
}

// One event of a job's stream: progress is drawn at once; a terminal event loads the job's view.
function onEvent(id, type, event) {
  const box = jobBox(id);
  box.dataset.events = ((box.dataset.events || "") + " " + type).trim();
  const data = event.data || {};
  if (type === "progress") {
    box.dataset.status = "running";
    box.querySelector(".state").textContent = "running" + (data.phase ? " \u2013 " + data.phase : "");
    showProgress(box, data.progress, data.step, data.total);
  } else if (type === "started" || type === "queued") {
    box.dataset.status = type === "started" ? "running" : "queued";
    box.querySelector(".state").textContent = type === "started" ? "running (attempt " + data.attempt + ")" : "queued" + (data.reason ? " \u2013 " + data.reason : "");
  } else if (type === "validation" && data.url) {
    const img = document.createElement("img"); img.src = data.url; img.alt = "validation image";
    box.querySelector(".validation-image").replaceChildren(img);
  } else if (type === "done" || type === "failed" || type === "cancelled") {
    poll(id);
  }
}

// Server-Sent Events read with fetch (EventSource cannot send the API key): reconnects with
// Last-Event-ID until a terminal event, or the job is gone.
const streams = new Map();
async function follow(id) {
  if (streams.has(id)) return;
  const controller = new AbortController();
  streams.set(id, controller);
  let last = "", ended = false;
  try {
    while (!ended) {
      const h = headers();
      if (last) h["Last-Event-ID"] = last;
      const resp = await fetch("/v1/experts/" + id + "/events", { headers: h, signal: controller.signal });
      if (!resp.ok) break;
      const reader = resp.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const fields = {};
          for (const line of buffer.slice(0, cut).split("\n")) {
            const at = line.indexOf(": ");
            if (at > 0) fields[line.slice(0, at)] = line.slice(at + 2);
          }
          buffer = buffer.slice(cut + 2);
          if (!fields.event) continue;
          last = fields.id || last;
          onEvent(id, fields.event, JSON.parse(fields.data));
          if (["done", "failed", "cancelled"].includes(fields.event)) ended = true;
        }
      }
      if (!ended) await new Promise((r) => setTimeout(r, 2000));
    }
  } catch (e) { /* aborted or offline: the 1 s poll takes over */ }
  finally { streams.delete(id); }
}

async function poll(id) {
  try {
    const resp = await fetch("/v1/experts/" + id, { headers: headers() });
    if (!resp.ok) { watched.delete(id); return; }
    const job = await resp.json();
    renderJob(job);
    if (!(job.status === "queued" || job.status === "running")) watched.delete(id);
  } catch (e) { /* try again on the next tick */ }
}

function watch(id) { watched.set(id, true); poll(id); follow(id); }
setInterval(() => { for (const id of watched.keys()) if (!streams.has(id)) poll(id); }, 1000);  // only jobs without a stream

async function cancel(id, box) {
  const status = box.querySelector(".job-status");
  try {
    const resp = await fetch("/v1/experts/" + id, { method: "DELETE", headers: headers() });
    if (!resp.ok) return say(status, await errorOf(resp), true);
    renderJob(await resp.json());
    watched.delete(id);
    say(status, "cancelled");
  } catch (e) { say(status, "request failed: " + e, true); }
}

async function remove(id, box) {
  const status = box.querySelector(".job-status");
  try {
    const resp = await fetch("/v1/experts/" + id, { method: "DELETE", headers: headers() });
    if (!resp.ok) return say(status, await errorOf(resp), true);
    watched.delete(id);
    box.remove();
    say($("train-status"), "job " + id.slice(0, 8) + " deleted");
  } catch (e) { say(status, "request failed: " + e, true); }
}

async function generateWithExpert(id, box) {
  const status = box.querySelector(".job-status");
  const form = new FormData();
  form.append("prompt", box.querySelector(".expert-prompt").value);
  if ($("steps").value) form.append("steps", $("steps").value);
  say(status, "generating with the expert\u2026");
  try {
    const resp = await fetch("/v1/experts/" + id + "/generate", { method: "POST", body: form, headers: headers() });
    if (!resp.ok) return say(status, await errorOf(resp), true);
    const n = await showImages(resp, box.querySelector(".expert-results"));
    say(status, "the expert generated " + n + " image" + (n > 1 ? "s" : ""));
  } catch (e) { say(status, "request failed: " + e, true); }
}

// The job list: at start and whenever the API key changes (a wrong key is said next to it).
async function loadJobs() {
  const status = $("key-status");
  try {
    const resp = await fetch("/v1/experts?limit=20", { headers: headers() });
    if (resp.status === 401) {
      $("jobs").replaceChildren(); watched.clear(); for (const c of streams.values()) c.abort();
      return say(status, keyInput.value.trim() ? "wrong API key" : "this server needs an API key", true);
    }
    if (!resp.ok) return say(status, await errorOf(resp), true);
    say(status, keyInput.value.trim() ? "key accepted" : "");
    const jobs = (await resp.json()).jobs.reverse();
    for (const job of jobs) { renderJob(job); if (job.status === "queued" || job.status === "running") watch(job.id); }
  } catch (e) { say(status, "could not load the jobs: " + e, true); }
}
loadJobs();
</script>
</body>
</html>
"""

DOCS_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SuTI API</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 960px; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
  .op { border: 1px solid #ddd; border-radius: 6px; padding: .6rem .8rem; margin: .6rem 0; }
  .method { display: inline-block; min-width: 4.5rem; font-weight: bold; font-family: monospace; }
  .path { font-family: monospace; font-size: 1.05rem; }
  table { border-collapse: collapse; margin-top: .4rem; font-size: .9rem; } td, th { text-align: left; padding: .15rem .6rem .15rem 0; vertical-align: top; }
  .muted { color: #666; font-size: .9rem; } code { background: #f4f4f4; padding: 0 .2rem; }
</style>
</head>
<body>
<h1>SuTI API</h1>
<div class="muted">Drawn from <a href="/openapi.json">/openapi.json</a> (OpenAPI 3) by this page, with nothing fetched from
other sites. Requests with photos are <code>multipart/form-data</code>, e.g.
<code>curl -F images=@photo.png -F "prompt=a photo of it on the beach" http://HOST/v1/generate -o out.png</code>.
The web page is at <a href="/">/</a>.</div>
<div id="ops">loading&hellip;</div>
<script>
"use strict";
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
function typeOf(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) return typeOf(spec.components.schemas[schema.$ref.split("/").pop()], spec);
  if (schema.anyOf) return schema.anyOf.map((s) => typeOf(s, spec)).filter((t) => t !== "null").join(" | ");
  if (schema.type === "array") return "list of " + typeOf(schema.items, spec);
  if (schema.enum) return schema.enum.join(" | ");
  return (schema.format === "binary" ? "file" : schema.type) || "";
}
function limits(schema) {
  const parts = [];
  for (const [k, label] of [["minimum", ">="], ["maximum", "<="], ["minLength", "min length"], ["maxLength", "max length"]]) if (schema && schema[k] !== undefined) parts.push(label + " " + schema[k]);
  return parts.join(", ");
}
function fieldRows(table, rows) {
  for (const [name, where, type, required, notes] of rows) {
    const tr = el("tr");
    tr.append(el("td", "", name), el("td", "muted", where), el("td", "", type), el("td", "muted", required ? "required" : ""), el("td", "muted", notes));
    table.append(tr);
  }
}
fetch("/openapi.json").then((r) => r.json()).then((spec) => {
  const box = document.getElementById("ops");
  box.replaceChildren();
  box.append(el("p", "muted", spec.info.title + " " + spec.info.version + " \u2014 " + (spec.info.description || "")));
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const div = el("div", "op"); div.dataset.path = path; div.dataset.method = method;
      div.append(el("span", "method", method.toUpperCase()), el("span", "path", path), el("div", "", op.summary || ""));
      if (op.description) div.append(el("div", "muted", op.description));
      const rows = [];
      for (const p of op.parameters || []) rows.push([p.name, p.in, typeOf(p.schema, spec), p.required, [limits(p.schema), p.description || ""].filter(Boolean).join("; ")]);
      const content = (op.requestBody || {}).content || {};
      for (const [media, body] of Object.entries(content)) {
        let schema = body.schema || {};
        if (schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
        const required = schema.required || [];
        for (const [name, prop] of Object.entries(schema.properties || {})) rows.push([name, media, typeOf(prop, spec), required.includes(name), [limits(prop), prop.description || ""].filter(Boolean).join("; ")]);
      }
      if (rows.length) { const table = el("table"); fieldRows(table, rows); div.append(table); }
      const codes = Object.entries(op.responses || {}).map(([code, r]) => code + " " + (r.description || "")).join(" \u00b7 ");
      div.append(el("div", "muted", "answers: " + codes));
      box.append(div);
    }
  }
}).catch((e) => { document.getElementById("ops").textContent = "could not load /openapi.json: " + e; });
</script>
</body>
</html>
"""
