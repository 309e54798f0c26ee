"use strict";
// The simsearch page: search by upload or by id, and review duplicate groups. Talks only to this server's /api.

const $ = (sel) => document.querySelector(sel);
const PAGE = 20;
const state = { info: null, dupOffset: 0, objectUrls: [] };

// A token can be handed over as #token=...; it is kept for this tab only and sent as a Bearer header.
function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (!m) return false;
  sessionStorage.setItem("simsearch-token", decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname);
  return true;
}
takeToken();
window.addEventListener("hashchange", () => { if (takeToken()) location.reload(); });

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = sessionStorage.getItem("simsearch-token");
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const res = await fetch(path, opts);
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || `HTTP ${res.status}`);
  return body;
}

function say(message, isError) {
  const s = $("#status");
  s.textContent = message;
  s.className = "show" + (isError ? " error" : "");
  clearTimeout(say.timer);
  if (!isError) say.timer = setTimeout(() => { s.className = ""; }, 6000);
}

function el(tag, attrs, children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children || []) if (c) e.append(c);
  return e;
}

function baseName(p) { return p.split("/").pop(); }
function kb(n) { return n == null ? "?" : n >= 1048576 ? (n / 1048576).toFixed(1) + " MB" : Math.round(n / 1024) + " KB"; }
function dims(w, h) { return w && h ? `${w}×${h}` : "?"; }

function releaseThumbs() {
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
}

// Thumbnails are fetched (not <img src>) so the Authorization header goes with them when a token is set.
function thumb(id, size, t) {
  const img = el("img", { alt: "", "data-id": String(id) });
  const at = t == null ? "" : `&t=${t}`;  // a video match: the frame that matched
  fetch(`/api/images/${id}/thumbnail?size=${size || 256}${at}`, { headers: headers() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .then((b) => { const u = URL.createObjectURL(b); state.objectUrls.push(u); img.src = u; })
    .catch(() => { img.alt = "(unavailable)"; });
  return el("div", { class: "thumb" }, [img]);
}

// ---- search -------------------------------------------------------------------------------------------------
function searchParams() {
  const p = new URLSearchParams({ k: $("#k").value || "20" });
  if ($("#min-score").value !== "") p.set("min_score", $("#min-score").value);
  if ($("#rerank").checked) p.set("rerank", "50");
  return p;
}

async function searchFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name || "pasted-image");
  say(`searching for ${file.name || "the pasted image"}…`);
  try {
    const res = await api(`/api/search?${searchParams()}`, { method: "POST", body: form });
    const preview = el("img", { alt: "query" });
    preview.src = URL.createObjectURL(file);
    showResults(res, preview);
  } catch (e) { say(e.message, true); }
}

async function searchId(id) {
  const p = searchParams();
  p.set("id", String(id));
  try {
    showResults(await api(`/api/search?${p}`), null);
    window.scrollTo(0, 0);
  } catch (e) { say(e.message, true); }
}

function showResults(res, preview) {
  releaseThumbs();
  if (preview) state.objectUrls.push(preview.src);
  const q = $("#query");
  const head = preview ? el("div", { class: "thumb" }, [preview]) : thumb(res.query_id, 128);
  q.replaceChildren(
    head,
    el("div", {}, [
      el("div", { text: `More like ${baseName(res.query)} (${dims(res.width, res.height)})` }),
      el("div", { class: "muted", text: `${res.matches.length} matches` }),
    ]),
  );
  const grid = $("#results");
  grid.replaceChildren(...res.matches.map((m) => el("div", {
    class: "card result", title: m.path, "data-id": String(m.id), onclick: () => searchId(m.id),
  }, [
    thumb(m.id, 256, m.time_s),
    el("div", { class: "meta" }, [
      el("div", { class: "name", text: baseName(m.path) }),
      el("span", { class: "score", text: m.score.toFixed(4) }),
      ...(m.inliers == null ? [] : [el("span", { class: "inliers", text: `  ${m.inliers} inliers` })]),
      ...(m.time_s == null ? [] : [el("span", { class: "time", text: `  video, at ${m.time_s.toFixed(1)} s` })]),
      el("span", { class: "muted", text: "  " + dims(m.width, m.height) }),
    ]),
  ])));
  say(`${res.matches.length} matches`);
}

function setupSearch() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    searchFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const f = [...(e.clipboardData ? e.clipboardData.files : [])].find((x) => x.type.startsWith("image/"));
    if (f) { e.preventDefault(); showView("search"); searchFile(f); }
  });
}

// ---- duplicates ---------------------------------------------------------------------------------------------
function dupParams() {
  return new URLSearchParams({
    threshold: $("#threshold").value || "0.9", group: "star", similar: $("#show-similar").checked ? "true" : "false",
  });
}

async function loadDuplicates(offset) {
  state.dupOffset = Math.max(0, offset || 0);
  const p = dupParams();
  p.set("offset", String(state.dupOffset));
  p.set("limit", String(PAGE));
  const ticket = (state.dupTicket = (state.dupTicket || 0) + 1);  // only the latest request may draw
  say("finding duplicates…");
  try {
    const rep = await api(`/api/duplicates?${p}`);
    if (ticket !== state.dupTicket) return;  // a newer request (another threshold, page or switch) is on its way
    releaseThumbs();
    $("#groups").replaceChildren(...rep.groups.map((g) => groupView(g, rep)));
    $("#groups").dataset.threshold = String(rep.threshold);  // which answer is drawn
    const last = Math.min(rep.offset + rep.groups.length, rep.total_groups);
    const others = rep.similar_files ? `; ${rep.similar_files} other shots (not copies)` : "";
    $("#dups-summary").textContent = rep.total_groups
      ? `groups ${rep.offset + 1}–${last} of ${rep.total_groups}; ${rep.duplicates} copies could go${others}`
      : "no duplicates at this threshold";
    $("#dups-prev").disabled = rep.offset === 0;
    $("#dups-next").disabled = last >= rep.total_groups;
    say(`${rep.total_groups} groups`);
  } catch (e) { if (ticket === state.dupTicket) say(e.message, true); }
}

function groupView(g, rep) {
  const readOnly = state.info && state.info.server.read_only;
  const similar = g.kind === "similar";
  const allowed = !similar || $("#include-similar").checked;
  const box = el("div", { class: "group" + (similar ? " similar" : ""), "data-ids": g.ids.join(","),
    "data-kind": g.kind });
  const members = g.members.map((m, k) => {
    const cb = el("input", { type: "checkbox", class: "trash-box", "data-id": String(m.id) });
    cb.checked = !m.keep && !similar;  // copies: the keep rules' choice, preselected; other shots: never
    cb.disabled = readOnly || !allowed;
    const shot = similar && g.shots && g.shots[k] && g.shots[k].sharpness != null ? g.shots[k] : null;
    const card = el("div", { class: "member " + (cb.checked ? "trash" : "keep"), title: m.path }, [
      thumb(m.id, 256),
      el("div", { class: "meta" }, [
        el("div", { class: "name", text: baseName(m.path) }),
        el("div", { text: `${dims(m.width, m.height)} · ${kb(m.size)}` }),
        el("div", { class: "score", text: `score ${m.score.toFixed(4)}` }),
        shot ? el("div", { class: "shot", text: `sharpness ${Math.round(shot.sharpness)} · clipped ${(100 * shot.clipped).toFixed(1)}%` }) : null,
        m.keep ? el("div", { class: "muted", text: similar ? "best shot" : "kept by the keep rules" }) : null,
      ]),
      el("label", {}, [cb, document.createTextNode(" trash")]),
    ]);
    cb.addEventListener("change", () => { card.className = "member " + (cb.checked ? "trash" : "keep"); });
    return card;
  });
  const apply = el("button", { type: "button", class: "primary apply", text: "Apply" });
  apply.disabled = readOnly || !allowed;
  const hint = similar && !allowed ? "other shots, not copies: tick “include other shots in Apply” to remove any" : "";
  const note = el("span", { class: "note muted", text: readOnly ? "read-only server" : hint });
  apply.addEventListener("click", () => resolveGroup(g, rep, box, note, apply));
  const title = similar
    ? `other shots of one scene (not copies): ${g.files.length} files, best shot first, min score ${g.min_score.toFixed(4)}`
    : `${g.kind} group: ${g.files.length} files, min score ${g.min_score.toFixed(4)}`;
  box.append(
    el("h3", { text: title }),
    el("div", { class: "members" }, members),
    el("div", { class: "actions" }, [apply, note]),
  );
  return box;
}

async function resolveGroup(g, rep, box, note, apply) {
  const remove = [...box.querySelectorAll(".trash-box")].filter((c) => c.checked).map((c) => Number(c.dataset.id));
  if (!remove.length) { say("nothing is marked for the trash", true); return; }
  if (remove.length === g.ids.length) { say("keep at least one file of the group", true); return; }
  if (!confirm(`Move ${remove.length} file(s) of this group to the index's trash? You can undo it.`)) return;
  try {
    const res = await api("/api/duplicates/resolve", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ids: g.ids, remove, action: "delete", threshold: rep.threshold, group: rep.group,
        include_similar: g.kind === "similar" }),
    });
    apply.disabled = true;
    box.querySelectorAll(".trash-box").forEach((c) => { c.disabled = true; });
    const undo = el("button", { type: "button", class: "undo", text: "Undo" });
    undo.addEventListener("click", () => undoResolve(res.undo, note, undo));
    note.className = "note done";
    note.replaceChildren(document.createTextNode(`${res.moved.length} file(s) moved to the trash. `), undo);
    say(`${res.moved.length} file(s) moved to the trash`);
  } catch (e) { say(e.message, true); }
}

async function undoResolve(name, note, button) {
  try {
    const res = await api("/api/undo", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ undo: name }),
    });
    button.disabled = true;
    note.textContent = `undone: ${res.restored} file(s) restored`;
    say(`restored ${res.restored} file(s)`);
  } catch (e) { say(e.message, true); }
}

// ---- layout -------------------------------------------------------------------------------------------------
function showView(name) {
  $("#view-search").hidden = name !== "search";
  $("#view-dups").hidden = name !== "dups";
  $("#tab-search").classList.toggle("active", name === "search");
  $("#tab-dups").classList.toggle("active", name === "dups");
}

async function start() {
  setupSearch();
  $("#tab-search").addEventListener("click", () => showView("search"));
  $("#tab-dups").addEventListener("click", () => { showView("dups"); loadDuplicates(0); });
  $("#dups-load").addEventListener("click", () => loadDuplicates(0));
  $("#show-similar").addEventListener("change", () => loadDuplicates(0));
  $("#include-similar").addEventListener("change", () => loadDuplicates(state.dupOffset));
  $("#dups-prev").addEventListener("click", () => loadDuplicates(state.dupOffset - PAGE));
  $("#dups-next").addEventListener("click", () => loadDuplicates(state.dupOffset + PAGE));
  try {
    state.info = await api("/api/info");
    $("#info").textContent = `${state.info.counts.images} images · ${state.info.backbone}` +
      (state.info.server.read_only ? " · read-only" : "");
    document.body.dataset.ready = "1";
  } catch (e) { say(e.message, true); }
}

start();
