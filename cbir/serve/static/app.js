// cbir-serve's page: search a database with an image, browse a database. No framework, no CDN: it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
// Class colours avoid the green and red of the right-class / wrong-class frames.
const PALETTE = ["#2456a6", "#d9822b", "#b83280", "#6b46c1", "#0f8b8d", "#8c6d1f", "#4a5568", "#3182ce",
                 "#9c4221", "#702459", "#5a67d8", "#2c7a7b", "#744210", "#97266d", "#2b6cb0", "#553c9a"];
const state = { health: null, db: null, info: null, colours: {}, query: null, classFromQuery: false };

// --- talking to the server -----------------------------------------------------------------------------------
function token() { return sessionStorage.getItem("cbir_token") || ""; }

function setToken(value) {
  sessionStorage.setItem("cbir_token", value);
  // Images load through <img>, which cannot send a header: reads also accept this cookie (writes never do).
  document.cookie = `cbir_token=${enc(value)}; path=/; SameSite=Strict`;
}

function askToken(why) {
  const value = window.prompt(`${why}\nThe server's token (from whoever started cbir-serve):`, "");
  if (value) setToken(value.trim());
  return Boolean(value);
}

async function api(path, options = {}, retry = true) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 && retry && askToken("This needs the server's token.")) {
    return api(path, options, false);
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(detail);
  }
  return response.json();
}

function notice(text, kind = "error") {
  const box = $("notice");
  box.textContent = text;
  box.className = `notice ${kind === "info" ? "info" : ""}`;
  box.hidden = !text;
}

const dbPath = (name) => `/api/databases/${enc(name)}`;
const colour = (cls) => state.colours[cls] || "#718096";

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function fact(list, term, value) { list.append(el("dt", {}, term), el("dd", {}, String(value))); }

// --- the database chosen --------------------------------------------------------------------------------------
async function loadDatabase(name) {
  state.db = name;
  state.info = await api(dbPath(name));
  state.colours = {};
  state.info.classes.forEach((c, i) => { state.colours[c.name] = PALETTE[i % PALETTE.length]; });
  const select = $("query-class");
  select.replaceChildren(el("option", { value: "" }, "unknown"));
  const names = $("class-names");
  names.replaceChildren();
  for (const { name: cls } of state.info.classes) {
    if (!cls) continue;
    select.append(el("option", { value: cls }, cls));
    names.append(el("option", { value: cls }));
  }
  $("to-database").href = `/db/${enc(name)}`;
  $("to-search").href = `/?db=${enc(name)}`;
}

async function examples() {
  const strip = $("examples");
  strip.replaceChildren();
  const classes = state.info.classes.filter((c) => c.name).slice(0, 8);
  const picks = await Promise.all(classes.map(({ name: cls, images: count }) =>
    api(`${dbPath(state.db)}/images?class=${enc(cls)}&limit=1&offset=${Math.floor(Math.random() * count)}`)));
  for (const listing of picks) {
    for (const item of listing.images) {
      const button = el("button", { type: "button", title: `${item.class} — search with it` },
                        el("img", { src: item.thumbnail_url, alt: item.class, loading: "lazy" }));
      button.addEventListener("click", () => searchStored(item));
      strip.append(button);
    }
  }
}

// --- searching ------------------------------------------------------------------------------------------------
async function search(blob, filename, knownClass) {
  state.query = { blob, filename };
  const image = $("query-image");
  if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(blob);
  image.hidden = false;
  $("drop-text").hidden = true;
  $("query-name").textContent = filename || "pasted image";
  // An image of the database brings its class; a file of the user's keeps the class they chose, unless the
  // previous query set it.
  if (knownClass !== undefined) $("query-class").value = knownClass;
  else if (state.classFromQuery) $("query-class").value = "";
  state.classFromQuery = knownClass !== undefined;
  await runSearch();
}

async function runSearch() {
  if (!state.query) return;
  const form = new FormData();
  form.append("image", state.query.blob, state.query.filename || "query.png");
  form.append("k", $("k").value);
  const known = $("query-class").value;
  if (known) form.append("query_class", known);
  $("summary").replaceChildren(el("p", { class: "hint" }, "Searching…"));
  try {
    const started = performance.now();
    const result = await api(`${dbPath(state.db)}/search`, { method: "POST", body: form });
    notice("");
    render(result, performance.now() - started);
  } catch (error) {
    $("summary").replaceChildren(el("p", { class: "hint" }, "No result."));
    $("gallery").replaceChildren();
    notice(error.message);
  }
}

async function searchStored(item) {
  const response = await fetch(item.image_url, { headers: token() ? { Authorization: `Bearer ${token()}` } : {} });
  if (!response.ok) { notice(`cannot load image ${item.id}`); return; }
  closeViewer();
  if (location.pathname !== "/") history.pushState({}, "", `/?db=${enc(state.db)}`), show();
  await search(await response.blob(), item.name, item.class);
}

function render(result, milliseconds) {
  const votes = {};
  for (const n of result.neighbours) votes[n.class] = (votes[n.class] || 0) + 1;
  const ranked = Object.entries(votes).sort((a, b) => b[1] - a[1]);
  const summary = $("summary");
  summary.replaceChildren();
  if (!ranked.length) {
    summary.append(el("p", { class: "hint" }, "The database is empty."));
  } else {
    const [best, count] = ranked[0];
    const verdict = el("div", { class: "verdict" },
      el("span", { class: "label" }, "Suggested class"),
      el("span", { class: "class" }, best || "unlabelled"),
      el("span", { class: "votes" }, `${count} of ${result.neighbours.length} neighbours`));
    if (result.query_class) {
      const right = best === result.query_class;
      verdict.append(el("span", { class: `check ${right ? "good" : "bad"}` },
        right ? "✓ the known class" : `✗ known class: ${result.query_class}`));
    }
    const bar = el("div", { class: "votebar" });
    const legend = el("div", { class: "legend" });
    for (const [cls, n] of ranked) {
      bar.append(el("span", { style: `width:${(100 * n) / result.neighbours.length}%;background:${colour(cls)}`,
                              title: `${cls}: ${n}` }));
      legend.append(el("span", {}, el("i", { style: `background:${colour(cls)}` }), `${cls || "unlabelled"} ${n}`));
    }
    summary.append(verdict, bar, legend, el("div", { class: "meta" },
      `${result.neighbours.length} nearest of ${state.info.images} images in “${result.database}” · ` +
      `${Math.round(result.seconds * 1000)} ms on the server, ${Math.round(milliseconds)} ms here · ` +
      "distance: 0 = identical, 4 = opposite"));
  }
  const gallery = $("gallery");
  gallery.replaceChildren();
  for (const n of result.neighbours) {
    const frame = n.same_class === true ? "same" : n.same_class === false ? "other" : "";
    const card = el("button", { type: "button", class: `card ${frame}`, title: `open ${n.name}` },
      el("img", { src: n.thumbnail_url, alt: `${n.class} neighbour ${n.rank}`, loading: "lazy" }),
      el("span", { class: "caption" },
        el("span", { class: "top" },
          el("span", {}, `#${n.rank}`, frame ? el("b", { class: `check ${frame === "same" ? "good" : "bad"}` },
                                                  frame === "same" ? " ✓" : " ✗") : ""),
          el("span", {}, `distance ${n.distance.toFixed(3)}`)),
        el("span", { class: "cls" }, el("i", { style: `background:${colour(n.class)}` }), n.class || "unlabelled")));
    card.addEventListener("click", () => openViewer(n));
    gallery.append(card);
  }
}

// --- one image, large -----------------------------------------------------------------------------------------
let shown = null;

function openViewer(item) {
  shown = item;
  $("viewer-image").src = item.image_url;
  $("viewer-open").href = item.image_url;
  $("viewer-title").textContent = item.class || "unlabelled";
  const facts = $("viewer-facts");
  facts.replaceChildren();
  if (item.rank) fact(facts, "rank", item.rank);
  if (item.distance !== undefined) fact(facts, "distance", item.distance.toFixed(4));
  fact(facts, "project", item.project || "—");
  fact(facts, "file", item.name);
  fact(facts, "id", item.id);
  $("viewer-remove").hidden = !(state.health && state.health.writes);
  $("viewer").hidden = false;
  $("viewer-close").focus();
}

function closeViewer() { $("viewer").hidden = true; shown = null; }

async function removeShown() {
  if (!shown || !window.confirm(`Remove image ${shown.id} (${shown.class}) from “${state.db}”?`)) return;
  if (!token() && !askToken("Removing needs the server's token.")) return;
  try {
    await api(`${dbPath(state.db)}/images/${shown.id}`, { method: "DELETE" });
    closeViewer();
    notice("Removed.", "info");
    await loadDatabase(state.db);
    if (location.pathname.startsWith("/db/")) await databasePage(); else await runSearch();
  } catch (error) { notice(error.message); }
}

// --- the database page ----------------------------------------------------------------------------------------
async function databasePage() {
  const info = state.info;
  $("db-title").textContent = info.name;
  const facts = $("db-facts");
  facts.replaceChildren();
  fact(facts, "images", info.images.toLocaleString());
  fact(facts, "classes", info.classes.length);
  fact(facts, "projects", Object.keys(info.projects).join(", ") || "—");
  fact(facts, "extractor", info.extractor ? `${info.extractor.name}, ${info.extractor.num_features} values` : "none yet");
  fact(facts, "index", info.index === "Flat" ? "exact (Flat)" : info.index);
  const most = Math.max(1, ...info.classes.map((c) => c.images));
  const body = $("class-table").tBodies[0];
  body.replaceChildren();
  for (const { name: cls, project, images: count } of info.classes) {
    body.append(el("tr", {}, el("td", {}, el("i", { style: `background:${colour(cls)}` }), cls || "unlabelled"),
      el("td", {}, project || "—"), el("td", { class: "num" }, String(count)),
      el("td", { class: "bar" }, el("span", { style: `width:${(100 * count) / most}%;background:${colour(cls)}` }))));
  }
  $("add-panel").hidden = !(state.health && state.health.writes);
  const samples = $("samples");
  samples.replaceChildren();
  const rows = await Promise.all(info.classes.map(({ name: cls }) =>
    api(`${dbPath(info.name)}/images?class=${enc(cls)}&limit=8`)));
  info.classes.forEach(({ name: cls, images: count }, i) => {
    const thumbs = el("div", { class: "thumbs" });
    for (const item of rows[i].images) {
      const button = el("button", { type: "button", title: item.name },
                        el("img", { src: item.thumbnail_url, alt: cls, loading: "lazy" }));
      button.addEventListener("click", () => openViewer(item));
      thumbs.append(button);
    }
    samples.append(el("div", { class: "row" }, el("h3", {}, `${cls || "unlabelled"} · ${count} images`), thumbs));
  });
}

async function addImages(event) {
  event.preventDefault();
  const files = $("add-files").files;
  if (!files.length) return;
  if (!token() && !askToken("Adding images needs the server's token.")) return;
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  form.append("label", $("add-label").value.trim());
  $("add-result").textContent = "Adding…";
  try {
    const result = await api(`${dbPath(state.db)}/images`, { method: "POST", body: form });
    const fresh = result.added.filter((a) => a.new).length;
    $("add-result").textContent = `${fresh} added, ${result.added.length - fresh} already there; ${result.images} images now.`;
    $("add-form").reset();
    await loadDatabase(state.db);
    await databasePage();
  } catch (error) { $("add-result").textContent = error.message; }
}

// --- wiring ---------------------------------------------------------------------------------------------------
function pickFile(file) {
  if (!file || !file.type.startsWith("image/")) { notice("That is not an image file."); return; }
  search(file, file.name);
}

function show() {
  const onDatabase = location.pathname.startsWith("/db/");
  $("search-view").hidden = onDatabase;
  $("database-view").hidden = !onDatabase;
  $("to-search").classList.toggle("active", !onDatabase);
  $("to-database").classList.toggle("active", onDatabase);
}

async function start() {
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("file").addEventListener("change", () => pickFile($("file").files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pickFile(e.dataTransfer.files[0]); });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) pickFile(item.getAsFile());
  });
  $("k").addEventListener("change", runSearch);
  $("query-class").addEventListener("change", () => { state.classFromQuery = false; runSearch(); });
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) closeViewer(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeViewer(); });
  $("viewer-search").addEventListener("click", () => shown && searchStored(shown));
  $("viewer-remove").addEventListener("click", removeShown);
  $("add-form").addEventListener("submit", addImages);
  $("token-button").addEventListener("click", () => askToken("Set the token for this browser tab."));
  window.addEventListener("popstate", () => boot());
  $("database").addEventListener("change", () => {
    const name = $("database").value;
    history.pushState({}, "", location.pathname.startsWith("/db/") ? `/db/${enc(name)}` : `/?db=${enc(name)}`);
    boot();
  });
  state.health = await (await fetch("/health")).json();
  $("token-button").hidden = state.health.auth === "none";
  await boot();
}

async function boot() {
  show();
  try {
    const listing = await api("/api/databases");
    const fromPath = location.pathname.startsWith("/db/") ? decodeURIComponent(location.pathname.slice(4)) : null;
    const wanted = fromPath || new URLSearchParams(location.search).get("db") || listing.default;
    const select = $("database");
    select.replaceChildren(...listing.databases.map((n) => el("option", { value: n }, n)));
    select.value = wanted;
    await loadDatabase(wanted);
    notice("");
    if (fromPath) await databasePage(); else await examples();
  } catch (error) { notice(error.message); }
}

start();
