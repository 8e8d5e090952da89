// finegrain web page: text search, search by dropped image, and an overlay of the regions that matched
// each sub-query. Plain JavaScript, no build step, no network beyond this server.
"use strict";

(function () {
  const COLOURS = ["#e5484d", "#2463eb", "#12a150", "#f08c00", "#8e4ec6", "#0891b2", "#d6409f", "#6b7280"];
  const $ = (id) => document.getElementById(id);
  const form = $("search-form"), query = $("query"), mode = $("mode"), kInput = $("k"), button = $("search-button");
  const drop = $("drop-zone"), fileInput = $("file-input"), preview = $("drop-preview");
  const toggle = $("overlay-toggle"), legend = $("legend"), status = $("status"), results = $("results");
  const authBox = $("auth"), keyInput = $("api-key");

  let apiKey = sessionStorage.getItem("finegrain-api-key") || "";
  let last = null;  // the last query: {kind: "text", text} or {kind: "image", file}
  let blobUrls = [];

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (apiKey) h["Authorization"] = "Bearer " + apiKey;
    return h;
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    const response = await fetch(path, opts);
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (response.status === 401) authBox.hidden = false;
    if (!response.ok) {
      const message = body && body.message ? body.message : "HTTP " + response.status;
      throw new Error(message);
    }
    return body;
  }

  function setStatus(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", !!isError);
  }

  async function loadStats() {
    try {
      const stats = await api("api/stats");
      authBox.hidden = true;
      mode.replaceChildren(...stats.modes.map((m) => new Option(m, m, false, m === stats.default_mode)));
      const seg = stats.segments ? ", segments " + stats.segments.levels.join("/") : ", global vectors only";
      $("index-info").textContent = stats.images + " images, encoder " + stats.encoder + seg;
      kInput.max = stats.limits.max_k;
      query.maxLength = stats.limits.max_query_chars;
      document.body.dataset.ready = "1";
    } catch (err) {
      $("index-info").textContent = "";
      setStatus(err.message, true);
    }
  }

  function k() {
    const n = parseInt(kInput.value, 10);
    return Number.isFinite(n) && n > 0 ? Math.min(n, parseInt(kInput.max, 10) || 100) : 12;
  }

  async function run(q) {
    last = q;
    const explain = toggle.checked;
    button.disabled = true;
    setStatus("searching\u2026");
    try {
      let data;
      if (q.kind === "text") {
        data = await api("api/search", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ text: q.text, k: k(), mode: mode.value, explain: explain }),
        });
      } else {
        const body = new FormData();
        body.append("image", q.file, q.file.name || "query");
        body.append("k", String(k()));
        body.append("mode", mode.value);
        body.append("explain", explain ? "true" : "false");
        data = await api("api/search/image", { method: "POST", body: body });
      }
      data.explained = explain;
      render(data, q);
    } catch (err) {
      setStatus(err.message, true);
    } finally {
      button.disabled = false;
    }
  }

  function render(data, q) {
    blobUrls.forEach((u) => URL.revokeObjectURL(u));
    blobUrls = [];
    results.replaceChildren();
    results.dataset.explained = data.explained ? "1" : "0";
    const subs = data.subqueries.length ? "; sub-queries: " + data.subqueries.join(" | ") : "";
    setStatus(data.results.length + " results in " + Math.round(data.stats.took_ms) + " ms (" + (data.requested_mode ? data.requested_mode + " \u2192 " : "") + data.mode + subs + ")");
    renderLegend(data, q);
    if (!data.results.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = "No results: the index is empty.";
      results.append(p);
      return;
    }
    for (const hit of data.results) results.append(card(hit));
  }

  function renderLegend(data, q) {
    legend.replaceChildren();
    const first = data.results.find((r) => r.explanation);
    if (!first) return;
    first.explanation.subqueries.forEach((sq, j) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      const swatch = document.createElement("i");
      swatch.style.background = COLOURS[j % COLOURS.length];
      chip.append(swatch, document.createTextNode(sq.full_query && q.kind === "text" ? "full query" : sq.text));
      legend.append(chip);
    });
  }

  function card(hit) {
    const article = document.createElement("article");
    article.className = "result";
    article.dataset.id = hit.id;
    const figure = document.createElement("figure");
    figure.className = "thumb";
    const img = document.createElement("img");
    img.alt = hit.name;
    loadThumbnail(img, hit.thumbnail);
    const overlay = document.createElement("div");
    overlay.className = "overlay";
    if (hit.explanation) drawRegions(overlay, hit.explanation);
    figure.append(img, overlay);
    const caption = document.createElement("div");
    caption.className = "caption";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = "#" + (hit.rank + 1) + " " + hit.name;
    name.title = hit.name + " (id " + hit.id + ")";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    caption.append(name, score);
    article.append(figure, caption);
    return article;
  }

  function drawRegions(overlay, e) {
    const [w, h] = e.image_size;
    let drawn = 0;
    e.subqueries.forEach((sq, j) => {
      if (!sq.best || !w || !h) return;
      const [x0, y0, x1, y1] = sq.best.box;
      const box = document.createElement("div");
      box.className = "box" + (sq.full_query ? " full-query" : "");
      box.dataset.subquery = sq.text;
      box.style.setProperty("--c", COLOURS[j % COLOURS.length]);
      box.style.left = (100 * x0 / w) + "%";
      box.style.top = (100 * y0 / h) + "%";
      box.style.width = (100 * (x1 - x0) / w) + "%";
      box.style.height = (100 * (y1 - y0) / h) + "%";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = sq.text + " " + sq.best.score.toFixed(2);
      box.title = sq.text + ": " + sq.best.score.toFixed(3) + " (level " + sq.best.level + ", ~" + sq.best.granularity + " segments)";
      box.append(label);
      overlay.append(box);
      drawn += 1;
    });
    if (!drawn) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "whole-image match " + e.global_score.toFixed(3) + (e.mode === "global" ? " (global mode)" : "");
      overlay.append(note);
    }
  }

  async function loadThumbnail(img, url) {
    if (!apiKey) { img.src = url; return; }
    try {  // with an API key the thumbnail needs the header, which <img src> cannot send
      const response = await fetch(url, { headers: headers() });
      if (!response.ok) return;
      const blobUrl = URL.createObjectURL(await response.blob());
      blobUrls.push(blobUrl);
      img.src = blobUrl;
    } catch (e) { /* leave the image empty */ }
  }

  function searchFile(file) {
    if (!file) return;
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    run({ kind: "image", file: file });
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = query.value.trim();
    if (!text) { setStatus("Type what to find, or drop an image.", true); return; }
    run({ kind: "text", text: text });
  });
  drop.addEventListener("click", () => fileInput.click());
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); fileInput.click(); }
  });
  fileInput.addEventListener("change", () => { searchFile(fileInput.files[0]); fileInput.value = ""; });
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("dragging")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = event.dataTransfer ? event.dataTransfer.files : null;
    if (files && files.length) searchFile(files[0]);
  });
  toggle.addEventListener("change", () => {
    document.body.classList.toggle("show-overlay", toggle.checked);
    // Results fetched without explanations: fetch them again, explained.
    if (toggle.checked && last && results.dataset.explained === "0") run(last);
  });
  mode.addEventListener("change", () => { if (last) run(last); });
  authBox.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = keyInput.value.trim();
    sessionStorage.setItem("finegrain-api-key", apiKey);
    loadStats();
  });

  document.body.classList.toggle("show-overlay", toggle.checked);
  loadStats();
})();
