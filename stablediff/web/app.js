// The page: a client of /v1 like any other. Text from users, files and the server is only ever set as text
// (textContent, value, Option): nothing here parses HTML.
import * as api from "./api.js";
import { ImageInput } from "./mask.js";

const FORM_KEY = "stablediff.form";
const $ = (id) => document.getElementById(id);
const form = $("job");
// active: the user's queued and running jobs (the queue panel); pending: jobs sent from this page whose end it has
// not shown yet (a fast job can end before the queue is next read)
// params: each parameter name of any task, once (its first task's entry)
const state = { tasks: {}, params: new Map(), models: [], lastSeed: null, watching: null, active: [], pending: [], historyPage: 1,
                queueTimer: null };
const image = new ImageInput($("canvas-box"), $("source-canvas"), $("mask-canvas"), { onChange: showImageSize });
const QUEUE_SIZE = 100, HISTORY_SIZE = 12; // jobs read for the queue panel; jobs a history page shows
const HIRES = ["hires_scale", "hires_steps", "hires_denoise", "hires_upscaler"];
const EMPTY = { steps: "the model's", seed: "random", subseed: "random", eta: "the sampler's", hires_steps: "as steps", hires_scale: "e.g. 2" };

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// An event handler whose failure is said on the page (or asks to sign in again), never lost in the console.
const guarded = (handler) => async (...args) => {
  try {
    await handler(...args);
  } catch (err) {
    if (err.status === 401) return showSignIn();
    $("result-note").textContent = err.message;
  }
};

// ---- signing in

// Who is signed in, and what the form is built from, asked at once (each request a round trip to the server).
async function boot() {
  const data = ["/v1/tasks", "/v1/models", "/v1/samplers", "/v1/loras", "/v1/embeddings"].map(api.get);
  data.forEach((p) => p.catch(() => {}));
  const jobs = api.get(`/v1/jobs?per_page=${QUEUE_SIZE}`); // one read for the queue and the first history page
  jobs.catch(() => {});
  const lists = Promise.all([refreshQueue(jobs), showHistory(1, jobs)]);
  try {
    const me = await api.get("/v1/me");
    $("who-name").textContent = `signed in as ${me.user}`;
    $("who").hidden = !api.token.get();
  } catch (e) {
    if (e.status === 401) return showSignIn();
    $("form-error").textContent = e.message;
  }
  $("sign-in").hidden = true;
  $("app").hidden = false;
  await load(data, lists);
}

function showSignIn() {
  api.token.clear();
  $("app").hidden = true;
  $("who").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-user").focus();
}

$("sign-in-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("sign-in-error").textContent = "";
  try {
    await api.signIn($("sign-in-user").value, $("sign-in-password").value);
    $("sign-in-password").value = "";
    await boot();
  } catch (err) {
    $("sign-in-error").textContent = err.status === 401 ? "That user name and password are not this server's." : err.message;
  }
});

$("sign-out").addEventListener("click", async () => {
  await api.signOut().catch(() => {});
  showSignIn();
});

// ---- the form: fields shown by the task's parameters (GET /v1/tasks), kept in localStorage as they are typed

async function load(data, lists) {
  const [tasks, models, samplers, loras, embeddings] = await Promise.all(data);
  state.tasks = tasks;
  for (const p of Object.values(tasks).flat()) if (!state.params.has(p.name)) state.params.set(p.name, p);
  state.models = models.models;
  fillSelect($("f-model"), models.models.map((m) => [m, m]));
  $("f-model").value = models.default;
  fillSelect($("f-sampler"), [["", "the model's own"], ...samplers.samplers.map((s) => [s.name, s.label])]);
  fillSelect($("f-schedule"), [["", "the sampler's own"], ...samplers.schedules.map((s) => [s.name, s.label])]);
  for (const name of ["fill", "resize_mode", "hires_upscaler"]) {
    fillSelect(form.elements[name], state.params.get(name).choices.map((c) => [c, c]));
  }
  fillSelect($("lora-pick"), loras.loras.length ? loras.loras.map((l) => [l.name, l.path]) : [["", "(none on this server)"]]);
  fillSelect($("embedding-pick"), embeddings.embeddings.length ? embeddings.embeddings.map((n) => [n, n])
                                                              : [["", "(none on this server)"]]);
  setDefaults();
  restore();
  applyTask();
  performance.mark("stablediff-form"); // the form can be used
  await lists;
  performance.mark("stablediff-ready"); // and the queue and the first history page are shown
  document.body.dataset.ready = "1";
}

function fillSelect(select, entries) {
  select.replaceChildren(...entries.map(([value, text]) => new Option(text, value)));
}

function setSelect(select, value) {
  value = value ?? "";
  if (![...select.options].some((o) => o.value === String(value))) select.append(new Option(String(value), value));
  select.value = value;
}

const task = () => form.elements.task.value;
const spec = (name = task()) => state.tasks[name] || [];

// Parameters whose default differs between tasks stay empty (the task's own default, shown as the placeholder).
function setDefaults() {
  const seen = {};
  for (const p of Object.values(state.tasks).flat()) (seen[p.name] ||= new Set()).add(JSON.stringify(p.default));
  for (const p of spec("txt2img").concat(spec("inpaint"))) {
    const input = form.elements[p.name];
    if (!input || input instanceof RadioNodeList || p.default === null || seen[p.name].size > 1) continue;
    if (input.type === "checkbox") input.checked = p.default;
    else input.value = p.default;
  }
}

function applyTask() {
  const names = new Set(spec().map((p) => p.name));
  names.add("model");
  for (const node of form.querySelectorAll("[data-param]")) node.hidden = !names.has(node.dataset.param);
  for (const node of document.querySelectorAll("[data-tasks]")) node.hidden = !node.dataset.tasks.split(" ").includes(task());
  for (const p of spec()) {
    const input = form.elements[p.name];
    if (input && !(input instanceof RadioNodeList) && "placeholder" in input) {
      input.placeholder = p.default === null ? (EMPTY[p.name] || "the model's") : String(p.default);
      if (p.min !== null) input.min = p.min;
      if (p.max !== null) input.max = p.max;
    }
  }
  const own = names.has("image") ? "the image's own" : "the model's own";
  $("size-preset").options[0].textContent = own;
  for (const input of [$("f-width"), $("f-height")]) input.placeholder = own.replace("the ", "").replace(" own", "");
  showImageSize();
}

function showImageSize() {
  const note = $("image-size");
  if (!image.blob) return void (note.textContent = "No image chosen.");
  const ext = extend();
  note.textContent = task() === "outpaint"
    ? `${image.width} × ${image.height} → ${image.width + ext[0] + ext[1]} × ${image.height + ext[2] + ext[3]}`
    : task() === "upscale" ? `${image.width} × ${image.height} → ${image.width * 4} × ${image.height * 4}`
    : `${image.width} × ${image.height}`;
}

const extendInputs = () => [...form.querySelectorAll('input[name="extend"]')];
const extend = () => extendInputs().map((i) => parseInt(i.value, 10) || 0);

// One parameter's value from its field: undefined where empty (the server's default).
function read(p) {
  if (p.type === "tuple") return extend();
  const input = form.elements[p.name];
  if (!input) return undefined;
  if (p.type === "bool") return input.checked;
  if (input.value === "") return undefined;
  return p.type === "int" || p.type === "float" ? Number(input.value) : input.value;
}

function write(name, value) {
  if (name === "extend") return extendInputs().forEach((input, i) => { input.value = value?.[i] ?? 0; });
  const input = form.elements[name];
  if (!input) return;
  if (input instanceof RadioNodeList) input.value = value;
  else if (input.type === "checkbox") input.checked = Boolean(value);
  else if (input.tagName === "SELECT") setSelect(input, value);
  else input.value = value ?? "";
}

function jobRequest() {
  const body = { task: task(), model: $("f-model").value };
  for (const p of spec()) {
    if (p.type === "image") continue;
    if (HIRES.includes(p.name) && !$("hires-on").checked) continue;
    const value = read(p);
    if (value !== undefined) body[p.name] = value;
  }
  return body;
}

// Every field from a job's parameters (the history) or an infotext's settings (a dropped PNG); what could not be
// restored, in words.
function fill(settings) {
  let note = "";
  if (settings.task && state.tasks[settings.task]) form.elements.task.value = settings.task;
  for (const name of state.params.keys()) {
    if (name in settings && settings[name] !== undefined) write(name, settings[name]);
  }
  if ("model" in settings && settings.model) {
    const found = state.models.find((m) => m === settings.model || m.replace(/\.[^.]*$/, "") === settings.model);
    if (found) $("f-model").value = found;
    else note = `The model ${settings.model} is not on this server; kept ${$("f-model").value}.`;
  }
  $("hires-on").checked = Boolean(settings.hires_scale);
  syncPreset();
  applyTask();
  save();
  return note;
}

function save() {
  const values = { task: task(), hires_on: $("hires-on").checked, last_seed: state.lastSeed };
  for (const p of state.params.values()) if (p.type !== "image") values[p.name] = read(p) ?? "";
  values.model = $("f-model").value;
  localStorage.setItem(FORM_KEY, JSON.stringify(values));
}

function restore() {
  let saved;
  try { saved = JSON.parse(localStorage.getItem(FORM_KEY) || "null"); } catch { saved = null; }
  if (!saved) return;
  state.lastSeed = saved.last_seed ?? null;
  for (const [name, value] of Object.entries(saved)) if (name !== "model" || state.models.includes(value)) write(name, value);
  $("hires-on").checked = Boolean(saved.hires_on);
  syncPreset();
}

form.addEventListener("input", (e) => {
  clearError(e.target.name);
  if (e.target.dataset.multiple || e.target.name === "extend") checkMultiple(e.target, false);
  if (e.target.name === "width" || e.target.name === "height") syncPreset();
  if (e.target.name === "task") applyTask();
  if (e.target.name === "extend") showImageSize();
  save();
});
form.addEventListener("change", (e) => {
  if (e.target.dataset.multiple || e.target.name === "extend") checkMultiple(e.target, true);
  save();
});

// Widths, heights and the outpaint borders are multiples of 8: said as it is typed, made so when the field is left.
function checkMultiple(input, snap) {
  const v = Number(input.value);
  if (input.value === "" || v % 8 === 0) return clearError(input.name);
  const low = Math.max(8 * Math.floor(v / 8), input.name === "extend" ? 0 : 8), high = 8 * Math.ceil(v / 8);
  if (snap) {
    input.value = v - low <= high - v ? low : high;
    return clearError(input.name);
  }
  showError(input.name, `a multiple of 8: ${low} or ${high}`);
}

function syncPreset() {
  const w = $("f-width").value, h = $("f-height").value;
  const value = !w && !h ? "" : `${w}x${h}`;
  $("size-preset").value = [...$("size-preset").options].some((o) => o.value === value) ? value : "custom";
}

$("size-preset").addEventListener("change", () => {
  const value = $("size-preset").value;
  if (value === "custom") return $("f-width").focus();
  const [w, h] = value ? value.split("x") : ["", ""];
  $("f-width").value = w;
  $("f-height").value = h;
  save();
});

$("hires-on").addEventListener("change", () => {
  if ($("hires-on").checked && !$("f-hires_scale").value) $("f-hires_scale").value = 2;
  save();
});

$("seed-random").addEventListener("click", () => { $("f-seed").value = -1; save(); });
$("seed-last").addEventListener("click", () => {
  if (state.lastSeed === null) return void ($("form-note").textContent = "No image made yet: there is no last seed.");
  $("f-seed").value = state.lastSeed;
  save();
});

function insertAtCursor(textarea, text) {
  const { selectionStart: a, selectionEnd: b, value } = textarea;
  const before = value.slice(0, a), pad = before && !/\s$/.test(before) ? " " : "";
  textarea.value = before + pad + text + value.slice(b);
  textarea.selectionStart = textarea.selectionEnd = a + pad.length + text.length;
  textarea.focus();
  save();
}

$("lora-insert").addEventListener("click", () => {
  if ($("lora-pick").value) insertAtCursor($("f-prompt"), `<lora:${$("lora-pick").value}:1>`);
});
$("embedding-insert").addEventListener("click", () => {
  if ($("embedding-pick").value) insertAtCursor($("f-prompt"), $("embedding-pick").value);
});

// ---- errors beside the field they concern

function fieldNode(name) {
  const input = name === "extend" ? extendInputs()[0] : form.elements[name];
  const node = input && !(input instanceof RadioNodeList) ? input.closest("[data-param]") : null;
  return node && !node.hidden && !node.closest("[hidden]") ? node : null;
}

function showError(name, message) {
  const node = fieldNode(name);
  if (!node) return void ($("form-error").textContent = message);
  let p = node.querySelector(".error");
  if (!p) node.append(p = el("p", { className: "error", role: "alert" }));
  p.textContent = message;
  for (const input of node.querySelectorAll("input, select, textarea")) input.setAttribute("aria-invalid", "true");
  node.closest("details")?.setAttribute("open", "");
}

function clearError(name) {
  const node = name && fieldNode(name);
  if (!node) return;
  node.querySelector(".error")?.remove();
  for (const input of node.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

function clearErrors() {
  for (const p of form.querySelectorAll("[data-param] .error")) p.remove();
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  $("form-error").textContent = $("form-note").textContent = "";
}

// ---- generating

form.addEventListener("submit", (e) => { e.preventDefault(); generate(); });

async function generate() {
  clearErrors();
  for (const input of [...form.querySelectorAll("[data-multiple]"), ...extendInputs()]) checkMultiple(input, true);
  const body = jobRequest();
  const needs = spec().filter((p) => p.type === "image" && p.required).map((p) => p.name);
  if (needs.includes("image") && !image.blob) return showError("image", "choose an image first (or drop one here)");
  if (task() === "inpaint" && !image.anyPainted) return showError("image", "paint the mask: where the picture is to change");
  let payload = body;
  if (needs.length) {
    payload = new FormData();
    payload.append("request", JSON.stringify(body));
    payload.append("image", image.blob, "image.png");
    if (needs.includes("mask")) payload.append("mask", await image.maskBlob(), "mask.png");
  }
  $("generate").disabled = true;
  try {
    const job = await api.post("/v1/jobs", payload);
    $("form-note").textContent = job.position ? `Queued: ${job.position} ahead of it.` : "Queued.";
    state.pending.push(job.id);
    form.dataset.lastJob = job.id; // the page's own record of what it sent last (tests wait on it)
    await refreshQueue();
  } catch (err) {
    if (err.status === 401) return showSignIn();
    showError(err.field, err.message);
  } finally {
    $("generate").disabled = false;
  }
}

// ---- the queue and the job being watched

async function refreshQueue(read = null) {
  clearTimeout(state.queueTimer);
  try {
    const { jobs } = await (read || api.get(`/v1/jobs?per_page=${QUEUE_SIZE}`));
    state.active = jobs.filter((j) => j.state === "queued" || j.state === "running").reverse(); // oldest first
  } catch (err) {
    if (err.status === 401) return showSignIn();
    $("result-note").textContent = err.message;
  }
  $("queue").replaceChildren(...state.active.map((job) => el("li", { className: `job ${job.state}` },
    el("span", { className: "state", textContent: job.state === "running" ? "running" : `queued #${job.position + 1}` }),
    el("span", { className: "what", textContent: `${job.task}: ${job.params.prompt || "(no prompt)"}` }),
    el("button", { type: "button", textContent: "Cancel", ariaLabel: `Cancel the job ${job.params.prompt}`,
                   onclick: () => cancel(job.id) }))));
  $("queue-empty").hidden = state.active.length > 0;
  if (state.active.length) state.queueTimer = setTimeout(refreshQueue, 1500);
  if (state.active.length || state.pending.length) watch();
}

async function cancel(id) {
  try {
    await api.del(`/v1/jobs/${id}`);
  } catch (err) {
    $("result-note").textContent = err.message;
  }
  await refreshQueue();
}

async function watch() {
  if (state.watching) return;
  while (state.active.length || state.pending.length) {
    const next = state.active.find((j) => j.state === "running")?.id ?? state.pending[0] ?? state.active[0].id;
    state.watching = next;
    try {
      await follow(next);
      state.pending = state.pending.filter((id) => id !== next);
    } catch (err) {
      $("result-note").textContent = err.message;
      if (err.status === 404) state.pending = state.pending.filter((id) => id !== next);
      await sleep(1000);
    }
    state.watching = null;
    await refreshQueue();
  }
  $("progress").hidden = true;
}

async function follow(id) {
  $("progress").hidden = false;
  $("preview").hidden = true;
  for await (const { event, data } of api.events(`/v1/jobs/${id}/events`)) {
    if (event === "preview") {
      $("preview").src = `data:image/png;base64,${data.png}`;
      $("preview").hidden = false;
    } else if (event === "end") {
      await showResult(data);
      return;
    } else showProgress(data);
  }
}

function showProgress({ state: s, position, progress: p, eta_seconds: eta }) {
  const bar = $("progress-bar");
  if (s === "queued") {
    bar.removeAttribute("value");
    $("progress-text").textContent = position ? `Queued: ${position} job(s) ahead of it.` : "Queued: next.";
    return;
  }
  if ($("form-note").textContent.startsWith("Queued")) $("form-note").textContent = "";
  if (!p.steps) return void ($("progress-text").textContent = "Starting (loading the model)...");
  bar.value = ((p.batch || 1) - 1 + p.step / p.steps) / (p.batches || 1);
  const size = p.images / (p.batches || 1);
  const last = Math.min(p.image + size - 1, p.images);
  const images = last > p.image ? `images ${p.image}-${last} of ${p.images}` : `image ${p.image} of ${p.images}`;
  $("progress-text").textContent = `Step ${p.step} of ${p.steps} · ${images}` +
    (eta !== null ? ` · about ${Math.ceil(eta)} s left` : "");
}

async function showResult(job) {
  $("progress").hidden = true;
  if (job.state === "done") {
    state.lastSeed = job.images.length ? job.images[0].seed : state.lastSeed;
    save();
    const flagged = job.images.filter((im) => im.nsfw_content_detected).length;
    $("result-note").textContent = `Done: ${job.images.length} image(s)` +
      (flagged ? `, ${flagged} flagged by the safety checker (shown black).` : ".");
    $("results").replaceChildren(...await Promise.all(job.images.map((im) => thumb(job, im))));
  } else {
    $("result-note").textContent = job.state === "failed" ? `The job failed: ${job.error}` : "Cancelled.";
  }
  if (state.historyPage === 1) await showHistory(1);
  $("results").dataset.job = job.id; // shown, in Results and the history
}

$("cancel").addEventListener("click", () => state.watching && cancel(state.watching));

// ---- results and history

async function thumb(job, im) {
  const img = el("img", { src: await api.imageURL(im.url), alt: `${job.params.prompt || "image"} (seed ${im.seed})` });
  img.dataset.seed = im.seed;
  await img.decode().catch(() => {}); // shown when it is put in, not a moment later
  const button = el("button", { type: "button", className: "thumb", ariaLabel: `Open the image of seed ${im.seed}`,
                                onclick: guarded(() => view(job, im)) }, img);
  // the server's safety checker replaced it by a black image: said, not left to look like a failed render
  return el("li", {}, button, ...(im.nsfw_content_detected ? [el("p", { className: "flagged", textContent: im.warning })] : []));
}

async function showHistory(page, read = null) {
  let found;
  try {
    found = read ? { jobs: (await read).jobs.slice(0, HISTORY_SIZE), per_page: HISTORY_SIZE }
                 : await api.get(`/v1/jobs?page=${page}&per_page=${HISTORY_SIZE}`);
  } catch (err) {
    if (err.status === 401) return showSignIn();
    return void ($("result-note").textContent = err.message);
  }
  state.historyPage = page;
  const items = found.jobs.flatMap((job) => job.state === "done" ? job.images.map((im) => thumb(job, im))
    : job.state === "queued" || job.state === "running" ? []
    : [el("li", { className: "ended", textContent: `${job.state}: ${job.params.prompt || "(no prompt)"}` +
                                                   (job.error ? ` (${job.error})` : "") })]);
  $("history").replaceChildren(...await Promise.all(items));  // the images fetched side by side
  $("history-page").textContent = `page ${page}`;
  $("history-newer").disabled = page === 1;
  $("history-older").disabled = found.jobs.length < found.per_page;
}

$("history-newer").addEventListener("click", () => showHistory(Math.max(1, state.historyPage - 1)));
$("history-older").addEventListener("click", () => showHistory(state.historyPage + 1));

let viewing = null;

async function view(job, im) {
  viewing = { job, im };
  const url = await api.imageURL(im.url);
  $("viewer-image").src = url;
  $("viewer-image").alt = job.params.prompt || "image";
  $("viewer-info").textContent = im.nsfw_content_detected ? `${im.warning}\n\n${im.infotext}` : im.infotext;
  $("viewer-download").href = url;
  $("viewer-download").download = `${job.id}-${im.url.split("/").pop()}`;
  $("viewer").showModal();
}

$("viewer-close").addEventListener("click", () => $("viewer").close());

$("viewer-use").addEventListener("click", guarded(async () => {
  const { job, im } = viewing;
  $("viewer").close();
  $("form-note").textContent = fill({ ...job.params, task: job.task, seed: im.seed });
  if (job.inputs.image) await image.set(await api.imageBlob(job.inputs.image),
                                        job.inputs.mask ? await api.imageBlob(job.inputs.mask) : null);
  $("f-prompt").focus();
}));

for (const [id, target] of [["viewer-img2img", "img2img"], ["viewer-inpaint", "inpaint"]]) {
  $(id).addEventListener("click", guarded(async () => {
    $("viewer").close();
    await image.set(await api.imageBlob(viewing.im.url));
    form.elements.task.value = target;
    applyTask();
    save();
  }));
}

// ---- the image and its mask; dropping files

$("f-image").addEventListener("change", async (e) => {
  if (e.target.files[0]) await setImage(e.target.files[0]);
});

async function setImage(file) {
  clearError("image");
  try {
    await image.set(file);
  } catch {
    showError("image", `${file.name} is not an image this browser can read`);
  }
}

for (const input of form.elements["mask-tool"]) input.addEventListener("change", () => { image.tool = input.value; });
$("brush-size").addEventListener("input", () => { image.size = Number($("brush-size").value); $("brush-size-value").value = image.size; });
$("mask-clear").addEventListener("click", () => image.clear());

document.addEventListener("dragover", (e) => {
  if (![...e.dataTransfer.types].includes("Files")) return;
  e.preventDefault();
  $("drop-note").hidden = false;
});
document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) $("drop-note").hidden = true; });
document.addEventListener("drop", async (e) => {
  $("drop-note").hidden = true;
  const file = e.dataTransfer?.files[0];
  if (!file) return;
  e.preventDefault();
  if (e.target.closest?.(".image-field")) return setImage(file);
  await restoreFrom(file);
});

// A PNG's `parameters` (ours or AUTOMATIC1111's), read by the server (POST /v1/png-info), into the form.
async function restoreFrom(file) {
  clearErrors();
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = reject;
    reader.readAsDataURL(file);
  });
  try {
    const info = await api.post("/v1/png-info", { image: data });
    if (!info.settings) return void ($("form-note").textContent = `${file.name} carries no generation settings.`);
    const s = { ...info.settings };
    if ("denoising_strength" in s) s[s.hires_scale ? "hires_denoise" : "strength"] = s.denoising_strength;
    $("form-note").textContent = `Settings restored from ${file.name}. ${fill(s)}`.trim();
  } catch (err) {
    $("form-error").textContent = `${file.name}: ${err.message}`;
  }
}

// ---- keyboard: Ctrl+Enter generates, Esc cancels the job being watched (or closes the viewer, as dialogs do)

document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("app").hidden) {
    e.preventDefault();
    generate();
  } else if (e.key === "Escape" && !$("viewer").open && state.watching) {
    e.preventDefault();
    cancel(state.watching);
  }
});

boot();
