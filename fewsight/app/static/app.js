// fewsight app: gallery, box drawing on a canvas, enrollment, proposals review, search, export.
// Plain JavaScript, no build step; every change is saved to the server at once (the server is the truth).
"use strict";

const PAGE = 48;          // thumbnails per gallery page
const HANDLE = 7;         // corner handle half-size, canvas pixels
const MIN_SIDE = 3;       // smallest box side, image pixels (a shorter drag is a click)
const COLORS = { drawn: "#2da44e", proposal: "#1f6feb", pending: "#f59e0b", selected: "#ff3b30" };

const state = {
  status: null, total: 0, offset: 0, page: [],
  id: null, info: null, img: null, scale: 1,
  boxes: [], proposals: [], selected: -1, current: -1,
  drag: null, lastProposals: -1, polling: null,
};

const $ = (id) => document.getElementById(id);
const view = $("view");
const ctx = view.getContext("2d");

// -- talking to the server --------------------------------------------------------------------------
async function api(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  let res;
  try { res = await fetch(url, init); } catch (e) { throw new Error("the server does not answer (" + e.message + ")"); }
  const data = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
  m.hidden = !text;
}

async function guarded(fn) {
  try { await fn(); } catch (e) { say(e.message, true); }
}

// -- status, gallery --------------------------------------------------------------------------------
async function refreshStatus() {
  const s = await api("GET", "/api/status");
  state.status = s;
  const enrolled = s.enrolled.length ? "enrolled: " + s.enrolled.join(", ") : "nothing enrolled";
  $("summary").textContent = `${s.images} images · ${s.skipped} skipped · ${s.boxes} boxes on ${s.annotated_images} images · ${enrolled}`;
  const list = $("class-list");
  list.innerHTML = "";
  for (const c of new Set([...s.classes, ...s.base_classes])) {
    const o = document.createElement("option"); o.value = c; list.appendChild(o);
  }
  const fmt = $("export-format");
  if (!fmt.options.length) for (const f of s.export_formats) { const o = document.createElement("option"); o.value = o.textContent = f; fmt.appendChild(o); }
  showProgress(s.propose);
}

async function loadPage(offset) {
  const data = await api("GET", `/api/images?offset=${offset}&limit=${PAGE}`);
  state.total = data.total; state.offset = offset; state.page = data.images;
  const g = $("gallery");
  g.innerHTML = "";
  for (const im of data.images) {
    const d = document.createElement("div");
    d.className = "thumb" + (im.id === state.id ? " current" : "");
    d.dataset.id = im.id; d.title = im.name;
    const img = document.createElement("img"); img.loading = "lazy"; img.alt = im.name; img.src = `/api/images/${im.id}/thumb`;
    d.appendChild(img);
    if (im.boxes) { const b = document.createElement("span"); b.className = "badge"; b.textContent = im.boxes; d.appendChild(b); }
    if (im.pending) { const b = document.createElement("span"); b.className = "badge pending"; b.textContent = im.pending; d.appendChild(b); }
    d.addEventListener("click", () => guarded(() => openImage(im.id)));
    g.appendChild(d);
  }
  const last = Math.min(offset + PAGE, data.total);
  $("page-text").textContent = data.total ? `${offset + 1}–${last} of ${data.total}` : "no images";
  $("page-prev").disabled = offset === 0;
  $("page-next").disabled = last >= data.total;
  if (data.skipped) {
    const sk = await api("GET", "/api/skipped");
    $("skipped-box").hidden = false;
    $("skipped-count").textContent = sk.skipped.length;
    $("skipped").innerHTML = "";
    for (const s of sk.skipped) { const li = document.createElement("li"); li.textContent = `${s.name}: ${s.reason}`; $("skipped").appendChild(li); }
  }
}

// -- one image --------------------------------------------------------------------------------------
async function openImage(id) {
  const data = await api("GET", `/api/images/${id}/annotations`);
  const img = new Image();
  await new Promise((ok, fail) => { img.onload = ok; img.onerror = () => fail(new Error("the image could not be shown")); img.src = `/api/images/${id}`; });
  state.id = id; state.info = data.image; state.img = img;
  state.boxes = data.boxes; state.proposals = data.proposals; state.selected = -1;
  const wrap = $("canvas-wrap");
  const maxW = Math.max(320, wrap.clientWidth - 12), maxH = Math.max(320, window.innerHeight - 260);
  state.scale = Math.min(maxW / img.width, maxH / img.height);
  view.width = Math.round(img.width * state.scale); view.height = Math.round(img.height * state.scale);
  view.dataset.scale = state.scale; view.dataset.image = id;
  $("image-title").textContent = `${data.image.name} (${data.image.width}×${data.image.height}) · image ${id + 1} of ${state.total}`;
  pickCurrent();
  draw();
  for (const t of document.querySelectorAll(".thumb")) t.classList.toggle("current", Number(t.dataset.id) === id);
  const pageStart = Math.floor(id / PAGE) * PAGE;
  if (pageStart !== state.offset) await loadPage(pageStart);
}

function minScore() { return Number($("score").value); }
function visibleProposals() { return state.proposals.filter((p) => p.status === "pending" && p.score >= minScore()); }

function pickCurrent() {
  const vis = visibleProposals();
  state.current = vis.length ? vis[0].rank : -1;
  renderProposals();
}

function renderProposals() {
  const ul = $("proposal-list");
  ul.innerHTML = "";
  for (const p of state.proposals) {
    if (p.status === "pending" && p.score < minScore()) continue;
    const li = document.createElement("li");
    li.textContent = `${p.label} ${p.score.toFixed(2)} ${p.status === "pending" ? "" : "(" + p.status + ")"}`;
    li.className = (p.rank === state.current ? "current " : "") + p.status;
    li.addEventListener("click", () => { state.current = p.rank; renderProposals(); draw(); });
    ul.appendChild(li);
  }
  if (!ul.children.length) ul.innerHTML = '<li class="muted">none for this image</li>';
}

function draw() {
  ctx.clearRect(0, 0, view.width, view.height);
  if (!state.img) return;
  ctx.drawImage(state.img, 0, 0, view.width, view.height);
  const s = state.scale;
  ctx.font = "12px system-ui, sans-serif";
  for (const p of visibleProposals()) {
    const [x1, y1, x2, y2] = p.box.map((v) => v * s);
    ctx.setLineDash([5, 4]);
    ctx.lineWidth = p.rank === state.current ? 3 : 1.5;
    ctx.strokeStyle = COLORS.pending;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.setLineDash([]);
    label(`${p.label} ${p.score.toFixed(2)}`, x1, y2 + 14, COLORS.pending);
  }
  state.boxes.forEach((b, i) => {
    const [x1, y1, x2, y2] = b.box.map((v) => v * s);
    ctx.lineWidth = i === state.selected ? 3 : 2;
    ctx.strokeStyle = i === state.selected ? COLORS.selected : COLORS[b.source] || COLORS.drawn;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    label(b.label, x1, y1 < 15 ? y1 + 15 : y1 - 3, ctx.strokeStyle);  // inside the box at the top edge
    if (i === state.selected) for (const [hx, hy] of corners(b)) ctx.fillRect(hx - HANDLE / 2, hy - HANDLE / 2, HANDLE, HANDLE);
  });
}

function label(text, x, y, color) {
  const w = ctx.measureText(text).width + 6;
  ctx.fillStyle = color; ctx.fillRect(x, y - 12, w, 15);
  ctx.fillStyle = "#fff"; ctx.fillText(text, x + 3, y);
  ctx.fillStyle = color;
}

function corners(b) {
  const [x1, y1, x2, y2] = b.box.map((v) => v * state.scale);
  return [[x1, y1], [x2, y1], [x1, y2], [x2, y2]];
}

// -- mouse: draw, move, resize ----------------------------------------------------------------------
function canvasPoint(ev) {
  const r = view.getBoundingClientRect();
  return [(ev.clientX - r.left) * (view.width / r.width), (ev.clientY - r.top) * (view.height / r.height)];
}

function hit(cx, cy) {
  if (state.selected >= 0) {
    const c = corners(state.boxes[state.selected]);
    for (let k = 0; k < 4; k++) if (Math.abs(cx - c[k][0]) <= HANDLE && Math.abs(cy - c[k][1]) <= HANDLE) return { index: state.selected, corner: k };
  }
  let best = -1, area = Infinity;
  state.boxes.forEach((b, i) => {
    const [x1, y1, x2, y2] = b.box.map((v) => v * state.scale);
    if (cx >= x1 && cx <= x2 && cy >= y1 && cy <= y2 && (x2 - x1) * (y2 - y1) < area) { best = i; area = (x2 - x1) * (y2 - y1); }
  });
  return best >= 0 ? { index: best, corner: -1 } : null;
}

view.addEventListener("mousedown", (ev) => {
  if (!state.img || ev.button !== 0) return;
  view.focus();
  const [cx, cy] = canvasPoint(ev);
  const h = hit(cx, cy);
  if (h) {
    state.selected = h.index;
    $("class-name").value = state.boxes[h.index].label;
    state.drag = { kind: h.corner >= 0 ? "resize" : "move", corner: h.corner, start: [cx, cy], orig: state.boxes[h.index].box.slice() };
  } else {
    state.selected = -1;
    state.drag = { kind: "new", start: [cx, cy], end: [cx, cy] };
  }
  draw();
});

window.addEventListener("mousemove", (ev) => {
  const d = state.drag;
  if (!d) return;
  const [cx, cy] = canvasPoint(ev);
  const s = state.scale, W = state.info.width, H = state.info.height;
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
  if (d.kind === "new") {
    d.end = [cx, cy];
    draw();
    const [x1, y1] = d.start;
    ctx.setLineDash([4, 3]); ctx.strokeStyle = COLORS.selected; ctx.lineWidth = 2;
    ctx.strokeRect(x1, y1, cx - x1, cy - y1); ctx.setLineDash([]);
    return;
  }
  const b = state.boxes[state.selected];
  const dx = (cx - d.start[0]) / s, dy = (cy - d.start[1]) / s;
  let [x1, y1, x2, y2] = d.orig;
  if (d.kind === "move") {
    const w = x2 - x1, h = y2 - y1;
    x1 = clamp(x1 + dx, W - w); y1 = clamp(y1 + dy, H - h); x2 = x1 + w; y2 = y1 + h;
  } else {
    if (d.corner === 0 || d.corner === 2) x1 = clamp(x1 + dx, W); else x2 = clamp(x2 + dx, W);
    if (d.corner === 0 || d.corner === 1) y1 = clamp(y1 + dy, H); else y2 = clamp(y2 + dy, H);
  }
  b.box = [Math.min(x1, x2), Math.min(y1, y2), Math.max(x1, x2), Math.max(y1, y2)];
  d.moved = true;
  draw();
});

window.addEventListener("mouseup", (ev) => {
  const d = state.drag;
  if (!d) return;
  state.drag = null;
  if (d.kind === "new") {
    const [cx, cy] = canvasPoint(ev);
    const s = state.scale, W = state.info.width, H = state.info.height;
    const c = (v, hi) => Math.min(Math.max(v / s, 0), hi);
    const box = [c(Math.min(d.start[0], cx), W), c(Math.min(d.start[1], cy), H), c(Math.max(d.start[0], cx), W), c(Math.max(d.start[1], cy), H)];
    if (box[2] - box[0] < MIN_SIDE || box[3] - box[1] < MIN_SIDE) { draw(); return; }
    const name = $("class-name").value.trim();
    if (!name) { say("type a class name first (new or known), then draw the box", true); draw(); return; }
    state.boxes.push({ box, label: name, source: "drawn" });
    state.selected = state.boxes.length - 1;
    save();
  } else if (d.moved) {
    save();
  }
  draw();
});

async function save() {
  const id = state.id;
  try {
    const data = await api("PUT", `/api/images/${id}/annotations`, { boxes: state.boxes });
    if (id === state.id) { state.boxes = data.boxes; draw(); }
    say("");
    refreshStatus().catch(() => {});
  } catch (e) {
    say(e.message, true);
    if (id === state.id) await openImage(id).catch(() => {}); // back to what the server holds
  }
}

function deleteSelected() {
  if (state.selected < 0) return;
  state.boxes.splice(state.selected, 1);
  state.selected = -1;
  draw();
  save();
}

// -- proposals: accept / reject / next --------------------------------------------------------------
async function decide(decision, body) {
  await api("POST", `/api/proposals/${decision}`, body);
  await reloadImage();
}

async function reloadImage() {
  const id = state.id;
  if (id !== null) {
    const data = await api("GET", `/api/images/${id}/annotations`);
    state.boxes = data.boxes; state.proposals = data.proposals;
    pickCurrent(); draw();
  }
  refreshStatus().catch(() => {});
}

async function decideCurrent(decision) {
  const p = state.proposals.find((q) => q.rank === state.current);
  if (!p) { say("no pending proposal above the min score on this image (n: next image)", false); return; }
  await decide(decision, { keys: [p.key] });
}

async function nextWithProposals() {
  const data = await api("GET", `/api/proposals?status=pending&min_score=${minScore()}&limit=1`);
  const ids = data.images;
  if (!ids.length) {
    say("no pending proposals left above the min score", false);
    if (state.id !== null && state.id + 1 < state.total) await openImage(state.id + 1);
    return;
  }
  const next = ids.find((i) => i > (state.id ?? -1));
  await openImage(next !== undefined ? next : ids[0]);
}

// -- background run ---------------------------------------------------------------------------------
function showProgress(p) {
  const bar = $("progress");
  bar.max = Math.max(p.total, 1); bar.value = p.done;
  const first = p.first_proposal_s != null ? ` · first after ${p.first_proposal_s.toFixed(1)} s` : "";
  $("progress-text").textContent = `${p.state} ${p.done}/${p.total} · ${p.proposals} proposals${first}` + (p.error ? ` · ${p.error}` : "");
  $("stop").disabled = p.state !== "running";
  if (p.state === "running" && !state.polling) state.polling = setInterval(poll, 1000);
}

async function poll() {
  const p = await api("GET", "/api/propose").catch(() => null);
  if (!p) return;
  showProgress(p);
  if (p.proposals !== state.lastProposals) {
    state.lastProposals = p.proposals;
    if (state.id !== null && !state.drag) {
      const data = await api("GET", `/api/images/${state.id}/annotations`).catch(() => null);
      if (data && data.image.id === state.id) { state.proposals = data.proposals; pickCurrent(); draw(); }
    }
    loadPage(state.offset).catch(() => {});
  }
  if (p.state !== "running") { clearInterval(state.polling); state.polling = null; refreshStatus().catch(() => {}); }
}

// -- search -----------------------------------------------------------------------------------------
async function search() {
  if (state.selected < 0) { say("select a box (click it) to search for similar objects", true); return; }
  const out = $("search-results");
  out.textContent = "searching… (the first search indexes the folder)";
  const data = await api("POST", "/api/search", { image: state.id, box: state.boxes[state.selected].box, k: 12 });
  out.innerHTML = "";
  if (!data.results.length) { out.textContent = "no similar objects found"; return; }
  for (const r of data.results) {
    const d = document.createElement("div"); d.className = "hit"; d.title = r.name;
    d.innerHTML = `<img loading="lazy" alt=""><span></span>`;
    d.querySelector("img").src = `/api/images/${r.image}/thumb`;
    d.querySelector("span").textContent = `${r.name} ${r.score.toFixed(2)}`;
    d.addEventListener("click", () => guarded(() => openImage(r.image)));
    out.appendChild(d);
  }
}

// -- wiring -----------------------------------------------------------------------------------------
function on(id, fn) { $(id).addEventListener("click", () => guarded(fn)); }

on("enroll", async () => {
  say("enrolling…");
  const r = await api("POST", "/api/enroll");
  say(`enrolled ${r.enrolled.map((n) => `${n} (${r.boxes[n]} boxes)`).join(", ")} from ${r.support_images} images`);
  await refreshStatus();
});
on("propose", async () => { showProgress(await api("POST", "/api/propose", {})); say("proposing in the background"); });
on("stop", async () => showProgress(await api("DELETE", "/api/propose")));
on("export", async () => {
  const r = await api("POST", "/api/export", { format: $("export-format").value });
  say(`exported ${r.boxes} boxes on ${r.images} images as ${r.format}: ${r.path}`);
});
on("delete-box", async () => deleteSelected());
on("search", search);
on("accept-all", async () => {
  const r = await api("POST", "/api/proposals/accept", { min_score: minScore() });
  say(`accepted ${r.decided} proposals scoring at least ${minScore().toFixed(2)}`);
  await reloadImage();
  await loadPage(state.offset);
});
on("page-prev", () => loadPage(Math.max(0, state.offset - PAGE)));
on("page-next", () => loadPage(state.offset + PAGE));

$("score").addEventListener("input", () => { $("score-text").textContent = minScore().toFixed(2); pickCurrent(); draw(); });
// Enter renames the selected box; typing alone only sets the class of the next boxes drawn.
$("class-name").addEventListener("keydown", (ev) => {
  if (ev.key !== "Enter") return;
  const name = $("class-name").value.trim();
  if (state.selected >= 0 && name && state.boxes[state.selected].label !== name) {
    state.boxes[state.selected].label = name; draw(); save();
  }
});

document.addEventListener("keydown", (ev) => {
  if (ev.target instanceof HTMLInputElement || ev.target instanceof HTMLSelectElement || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const keys = {
    a: () => decideCurrent("accept"), r: () => decideCurrent("reject"), n: nextWithProposals,
    Delete: async () => deleteSelected(), Backspace: async () => deleteSelected(),
    ArrowRight: () => state.id !== null && state.id + 1 < state.total ? openImage(state.id + 1) : null,
    ArrowLeft: () => state.id > 0 ? openImage(state.id - 1) : null,
    Escape: async () => { state.selected = -1; draw(); },
  };
  if (keys[ev.key]) { ev.preventDefault(); guarded(keys[ev.key]); }
});

guarded(async () => {
  await refreshStatus();
  await loadPage(0);
  if (state.total) await openImage(0);
  window.fewsightReady = true; // the browser test waits for this
});
