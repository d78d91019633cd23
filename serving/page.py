"""The web page served at ``/``: plain HTML and JavaScript (no build step), embedded here so it
ships inside the package. Drop photos, type a prompt, see images (apprentice); start a DreamBooth
job, watch its progress, then generate from it."""

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
  #status { min-height: 1.3rem; margin: .6rem 0; } #status.error { color: #b00; }
  .job { border: 1px solid #ddd; border-radius: 6px; padding: .6rem; margin: .5rem 0; }
  .job progress { width: 200px; }
</style>
</head>
<body>
<h1>SuTI</h1>
<div class="muted">Subject-driven text-to-image: the apprentice generates from your photos at once; a DreamBooth expert trains on them in the background.</div>

<div class="row muted"><label>API key (if the server needs one) <input id="api-key" type="password" autocomplete="off"></label></div>

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
<div id="results" class="images"></div>

<h2>3. Train a DreamBooth expert</h2>
<div class="row">
  <input id="class-noun" type="text" placeholder="class noun, e.g. dog" maxlength="40">
  <label>training steps <input id="train-steps" type="number" min="1" placeholder="recipe"></label>
  <button id="train">Train expert</button>
</div>
<div id="jobs"></div>

<div id="status" role="status"></div>

<script>
"use strict";
const $ = (id) => document.getElementById(id);
let photos = [];
const watched = new Map();

const keyInput = $("api-key");
keyInput.value = localStorage.getItem("suti-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("suti-api-key", keyInput.value));

function headers() {
  const key = keyInput.value.trim();
  return key ? { "X-API-Key": key } : {};
}

function say(text, error) {
  const el = $("status");
  el.textContent = text;
  el.className = error ? "error" : "";
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
  if (!photos.length) return say("add at least one photo first", true);
  const prompt = $("prompt").value.trim();
  if (!prompt) return say("type a prompt first", true);
  const form = new FormData();
  photos.forEach((f) => form.append("images", f, f.name));
  form.append("prompt", prompt);
  form.append("num_images", $("num-images").value || "1");
  if ($("steps").value) form.append("steps", $("steps").value);
  say("generating\u2026");
  $("generate").disabled = true;
  try {
    const resp = await fetch("/v1/generate", { method: "POST", body: form, headers: headers() });
    if (!resp.ok) return say(await errorOf(resp), true);
    const n = await showImages(resp, $("results"));
    say("generated " + n + " image" + (n > 1 ? "s" : "") + " (seed " + resp.headers.get("x-seed") + ")");
  } catch (e) { say("request failed: " + e, true); }
  finally { $("generate").disabled = false; }
});

$("train").addEventListener("click", async () => {
  const noun = $("class-noun").value.trim();
  if (!noun) return say("type the class noun of your subject (e.g. dog)", true);
  if (photos.length < 3 || photos.length > 5) return say("a DreamBooth expert needs 3 to 5 photos (you have " + photos.length + ")", true);
  const form = new FormData();
  photos.forEach((f) => form.append("images", f, f.name));
  form.append("class_noun", noun);
  if ($("train-steps").value) form.append("steps", $("train-steps").value);
  try {
    const resp = await fetch("/v1/experts", { method: "POST", body: form, headers: headers() });
    if (!resp.ok) return say(await errorOf(resp), true);
    const job = await resp.json();
    say("job " + job.id + " queued");
    watch(job.id);
  } catch (e) { say("request failed: " + e, true); }
});

function jobBox(id) {
  let box = document.getElementById("job-" + id);
  if (box) return box;
  box = document.createElement("div"); box.className = "job"; box.id = "job-" + id; box.dataset.job = id;
  box.innerHTML =
    '<div class="row"><b class="title"></b> <span class="state"></span> <progress max="1" value="0"></progress> <span class="pct"></span>' +
    ' <button class="cancel">Cancel</button></div>' +
    '<div class="row expert-generate" hidden><input type="text" class="expert-prompt" value="a {V} {class} on the beach" maxlength="300">' +
    ' <button class="expert-go">Generate with expert</button></div><div class="images expert-results"></div>';
  box.querySelector(".cancel").addEventListener("click", () => cancel(id));
  box.querySelector(".expert-go").addEventListener("click", () => generateWithExpert(id, box));
  $("jobs").prepend(box);
  return box;
}

function renderJob(job) {
  const box = jobBox(job.id);
  box.querySelector(".title").textContent = job.class_noun + " (" + job.id.slice(0, 8) + ")";
  let state = job.status + (job.phase && job.status === "running" ? " \u2013 " + job.phase : "");
  if (job.status === "failed" && job.error) state += ": " + job.error;
  box.querySelector(".state").textContent = state;
  box.dataset.status = job.status;
  box.querySelector("progress").value = job.progress || 0;
  box.querySelector(".pct").textContent = Math.round((job.progress || 0) * 100) + "%";
  box.querySelector(".cancel").hidden = !(job.status === "queued" || job.status === "running");
  box.querySelector(".expert-generate").hidden = job.status !== "done";
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

function watch(id) { watched.set(id, true); poll(id); }
setInterval(() => { for (const id of watched.keys()) poll(id); }, 1000);

async function cancel(id) {
  const resp = await fetch("/v1/experts/" + id, { method: "DELETE", headers: headers() });
  if (!resp.ok) return say(await errorOf(resp), true);
  renderJob(await resp.json());
  watched.delete(id);
}

async function generateWithExpert(id, box) {
  const form = new FormData();
  form.append("prompt", box.querySelector(".expert-prompt").value);
  if ($("steps").value) form.append("steps", $("steps").value);
  say("generating with the expert\u2026");
  try {
    const resp = await fetch("/v1/experts/" + id + "/generate", { method: "POST", body: form, headers: headers() });
    if (!resp.ok) return say(await errorOf(resp), true);
    const n = await showImages(resp, box.querySelector(".expert-results"));
    say("the expert generated " + n + " image" + (n > 1 ? "s" : ""));
  } catch (e) { say("request failed: " + e, true); }
}

(async () => {
  try {
    const resp = await fetch("/v1/experts?limit=20", { headers: headers() });
    if (!resp.ok) return;
    const jobs = (await resp.json()).jobs.reverse();
    for (const job of jobs) { renderJob(job); if (job.status === "queued" || job.status === "running") watched.set(job.id, true); }
  } catch (e) { /* the list is a convenience */ }
})();
</script>
</body>
</html>
"""
