// finegrain web page: text search (words or an expression), search by dropped image or by a result ("more like
// this"), filters, threshold, pages, a details panel, the overlay of the regions that matched each sub-query, the
// search in the URL (back/forward and shared links), keyboard use. Plain JavaScript, no build step, no network
// beyond this server, nothing inline (the page's CSP forbids it).
"use strict";

(function () {
  const COLOURS = ["#e5484d", "#2463eb", "#12a150", "#f08c00", "#8e4ec6", "#0891b2", "#d6409f", "#6b7280"];
  const FILTERS = ["path_prefix", "taken_after", "taken_before", "make", "model", "orientation"];
  // What a search is, as it appears in the URL (defaults are left out of it).
  const DEFAULTS = { q: "", like: "", shard: "", literal: "", mode: "auto", k: "12", offset: "0", threshold: "", sort: "score" };
  FILTERS.forEach((f) => { DEFAULTS[f] = ""; });
  // A quote, a lone + or - between terms, or a weight such as 2: makes the text an expression (docs/page.md).
  const EXPRESSION = /"|(^|\s)'|(^|\s)[+-](?=\s|$|["'])|(^|[\s+-])\d*\.?\d+:\S/;

  const $ = (id) => document.getElementById(id);
  const form = $("search-form"), query = $("query"), mode = $("mode"), kInput = $("k"), button = $("search-button");
  const drop = $("drop-zone"), fileInput = $("file-input"), preview = $("drop-preview");
  const toggle = $("overlay-toggle"), legend = $("legend"), status = $("status"), results = $("results");
  const authBox = $("auth"), keyInput = $("api-key"), badge = $("expr-badge"), literal = $("literal");
  const threshold = $("threshold"), sort = $("sort"), pager = $("pager"), pageInfo = $("page-info");
  const prevPage = $("prev-page"), nextPage = $("next-page");
  const details = $("details"), detailsList = $("details-list"), detailsImage = $("details-image");
  const detailsOpen = $("details-open"), detailsLike = $("details-like");

  let apiKey = sessionStorage.getItem("finegrain-api-key") || "";
  let stats = null;
  let current = null;  // the search shown: {state, file (an uploaded example, not in the URL), data}
  let detailsFor = null;  // the card whose details are open
  let blobUrls = [];
  let seq = 0;  // answers to older searches are dropped
  let finished = 0;

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

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ------------------------------------------------------------------ state <-> form <-> URL
  function formState() {
    const s = Object.assign({}, DEFAULTS);
    s.q = query.value.trim();
    s.literal = literal.checked ? "1" : "";
    s.mode = mode.value || "auto";
    s.k = String(kInput.value || DEFAULTS.k).trim();
    s.threshold = threshold.value.trim();
    s.sort = sort.value || "score";
    FILTERS.forEach((f) => { s[f] = $("f-" + f).value.trim(); });
    return s;
  }

  function showState(s) {
    query.value = s.q;
    literal.checked = s.literal === "1";
    if (![...mode.options].some((o) => o.value === s.mode)) mode.append(new Option(s.mode, s.mode));
    mode.value = s.mode;
    kInput.value = s.k;
    threshold.value = s.threshold;
    sort.value = s.sort;
    updateFilterCount(s);
    FILTERS.forEach((f) => {
      const input = $("f-" + f);
      if (input.tagName === "SELECT" && s[f] && ![...input.options].some((o) => o.value === s[f])) {
        input.append(new Option(s[f], s[f]));  // a value from a link the selector lacks: shown, and the server judges it
      }
      input.value = s[f];
    });
    updateBadge();
  }

  function fromUrl(search) {
    const params = new URLSearchParams(search);
    const s = Object.assign({}, DEFAULTS);
    Object.keys(DEFAULTS).forEach((key) => { if (params.has(key)) s[key] = params.get(key); });
    return s;
  }

  function toUrl(s) {
    const params = new URLSearchParams();
    Object.keys(DEFAULTS).forEach((key) => { if (s[key] !== DEFAULTS[key] && s[key] !== "") params.set(key, s[key]); });
    const text = params.toString();
    return location.pathname + (text ? "?" + text : "");
  }

  function isExpression(s) { return s.literal !== "1" && EXPRESSION.test(s.q); }

  function updateFilterCount(s) {
    const n = activeFilters(s).length + (s.threshold !== "" ? 1 : 0);
    $("filter-count").textContent = n ? "(" + n + " in use)" : "";
  }

  function updateBadge() { badge.hidden = !(query.value && !literal.checked && EXPRESSION.test(query.value)); }

  function activeFilters(s) {
    return FILTERS.filter((f) => s[f] !== "").map((f) => f + " " + s[f]);
  }

  // A number when the text is one, else the text itself: the server refuses it with a clear message.
  function num(text) { return text !== "" && Number.isFinite(Number(text)) ? Number(text) : text; }

  // ------------------------------------------------------------------ searching
  async function run(s, opts) {
    const options = opts || {};
    const file = options.file || null;
    const explain = toggle.checked;
    const mine = ++seq;
    button.disabled = true;
    setStatus("searching\u2026");
    if (!file && options.history) {
      const url = toUrl(s);
      if (options.history === "push" && url !== location.pathname + location.search) history.pushState(s, "", url);
      else history.replaceState(s, "", url);
    }
    const filters = {};
    FILTERS.forEach((f) => { if (s[f] !== "") filters[f] = s[f]; });
    try {
      let data;
      if (file) {
        const body = new FormData();
        body.append("image", file, file.name || "query");
        body.append("k", s.k);
        body.append("mode", s.mode);
        body.append("offset", s.offset);
        body.append("sort", s.sort);
        body.append("explain", explain ? "true" : "false");
        if (s.threshold !== "") body.append("threshold", s.threshold);
        if (Object.keys(filters).length) body.append("filters", JSON.stringify(filters));
        data = await api("api/search/image", { method: "POST", body: body });
      } else {
        const body = { k: num(s.k), mode: s.mode, explain: explain, offset: num(s.offset), sort: s.sort };
        if (s.like !== "") {
          body.like = num(s.like);
          if (s.shard !== "") body.like_shard = num(s.shard);  // shard sets: ids are per shard
        }
        else if (isExpression(s)) body.query = s.q;
        else body.text = s.q;
        if (s.threshold !== "") body.threshold = num(s.threshold);
        if (Object.keys(filters).length) body.filters = filters;
        data = await api("api/search", {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        });
      }
      if (mine !== seq) return;
      data.explained = explain;
      current = { state: s, file: file, data: data };
      render(data, s, !!file);
    } catch (err) {
      if (mine !== seq) return;
      current = { state: s, file: file, data: null };
      updateFilterCount(s);
      results.replaceChildren();
      pager.hidden = true;
      setStatus(err.message, true);
    } finally {
      if (mine === seq) {
        button.disabled = false;
        document.body.dataset.searches = String(++finished);  // for tests and scripts: a search has finished
      }
    }
  }

  function searchFromForm() {
    const s = formState();
    if (!s.q) { setStatus("Type what to find, or drop an image.", true); return; }
    s.offset = "0";
    run(s, { history: "push" });
  }

  function rerun(changes) {  // the search shown, with some of its settings changed (a page, the mode...)
    if (!current) return;
    const s = Object.assign({}, current.state, changes);
    run(s, { file: current.file, history: current.file ? null : "push" });
  }

  // An image's URL on this server; on a shard set a hit names its shard (ids are per shard).
  function imageUrl(id, shard, file) {
    return "api/images/" + id + (file ? "/file" : "") + (shard !== undefined && shard !== null && shard !== "" ? "?shard=" + shard : "");
  }

  function moreLike(id, shard) {
    const s = formState();
    s.q = "";
    s.like = String(id);
    s.shard = shard === undefined || shard === null ? "" : String(shard);
    s.offset = "0";
    closeDetails(false);
    query.value = "";
    updateBadge();
    run(s, { history: "push" });
  }

  // ------------------------------------------------------------------ rendering
  function render(data, s, byFile) {
    blobUrls.forEach((u) => URL.revokeObjectURL(u));
    blobUrls = [];
    closeDetails(false);
    results.replaceChildren();
    results.dataset.explained = data.explained ? "1" : "0";
    const subs = data.subqueries.length ? "; sub-queries: " + data.subqueries.join(" | ") : "";
    const what = s.like !== "" && !byFile ? "more like image " + s.like + ": " : isExpression(s) && !byFile ? "expression: " : "";
    const passed = data.allowed === null || data.allowed === undefined ? "" : " \u00b7 " + data.allowed + " image" + (data.allowed === 1 ? "" : "s") + " pass the filters";
    setStatus(what + data.results.length + " results in " + Math.round(data.stats.took_ms) + " ms (" +
      (data.requested_mode ? data.requested_mode + " \u2192 " : "") + data.mode + subs + ")" + passed);
    renderLegend(data, s, byFile);
    renderPager(data, s);
    updateFilterCount(s);
    if (!data.results.length) { results.append(emptyState(data, s)); return; }
    for (const hit of data.results) results.append(card(hit));
  }

  function renderPager(data, s) {
    const k = parseInt(s.k, 10) || data.k, offset = parseInt(s.offset, 10) || 0;
    pager.hidden = !data.results.length && offset === 0;
    prevPage.disabled = offset === 0;
    nextPage.disabled = data.results.length < k;
    const page = Math.floor(offset / k) + 1;
    pageInfo.textContent = "page " + page + (data.results.length
      ? " \u00b7 results " + (offset + 1) + "\u2013" + (offset + data.results.length) : "");
  }

  function emptyState(data, s) {
    const box = el("div", "empty");
    box.setAttribute("role", "note");
    if (stats && stats.images === 0) {
      box.append(el("h2", "", "The index has no images yet"),
        el("p", "", "Add some with: finegrain index FOLDER --index INDEX (this page picks them up by itself)."));
      return box;
    }
    box.append(el("h2", "", "No results"));
    const reasons = el("ul", "reasons"), filters = activeFilters(s), offset = parseInt(s.offset, 10) || 0;
    if (filters.length && data.allowed === 0) {
      reasons.append(el("li", "", "No image passes the filters (" + filters.join(", ") + "). Loosen or clear them."));
    } else {
      if (filters.length) {
        reasons.append(el("li", "", data.allowed + " image" + (data.allowed === 1 ? "" : "s") + " pass the filters (" +
          filters.join(", ") + ")."));
      }
      if (s.threshold !== "") {
        reasons.append(el("li", "", "The minimum score " + s.threshold + " drops every result scoring below it: " +
          "lower it or clear it (scores are shown under each image)."));
      }
      if (offset > 0) {
        reasons.append(el("li", "", "This page starts after result " + offset + ", past the last match: go back " +
          "to the first page."));
      }
      if (s.threshold === "" && offset === 0) reasons.append(el("li", "", "Nothing matched: try other words or another mode."));
    }
    box.append(reasons);
    const actions = el("div", "empty-actions");
    if (filters.length || s.threshold !== "") {
      const clear = el("button", "secondary", "Clear filters and minimum score");
      clear.type = "button";
      clear.id = "empty-clear";
      clear.addEventListener("click", () => { clearFilters(); rerun(Object.assign(filterReset(), { offset: "0" })); });
      actions.append(clear);
    }
    if (offset > 0) {
      const first = el("button", "secondary", "First page");
      first.type = "button";
      first.id = "empty-first";
      first.addEventListener("click", () => rerun({ offset: "0" }));
      actions.append(first);
    }
    if (actions.children.length) box.append(actions);
    return box;
  }

  function welcome() {
    current = null;
    closeDetails(false);
    results.replaceChildren();
    pager.hidden = true;
    legend.replaceChildren();
    setStatus("");
    const box = el("div", "welcome");
    box.setAttribute("role", "note");
    box.append(el("h2", "", "Search " + (stats ? stats.images + " images" : "your images")));
    box.append(el("p", "", "Describe what to find, drop an example image, or open a result's \u201cmore like " +
      "this\u201d. Combine terms with + and - in quotes; filters narrow the images searched."));
    const examples = el("p", "examples");
    examples.append(el("span", "muted", "Try: "));
    ["a cat next to a cup of coffee", "\"an animal\" - \"a cat\"", "2:\"a red car\" + \"night\""].forEach((text) => {
      const b = el("button", "example", text);
      b.type = "button";
      b.addEventListener("click", () => { query.value = text; updateBadge(); searchFromForm(); });
      examples.append(b);
    });
    box.append(examples, el("p", "muted", "Press / to type, arrow keys to move between results, Enter for details."));
    results.append(box);
  }

  function renderLegend(data, s, byFile) {
    legend.replaceChildren();
    const first = data.results.find((r) => r.explanation);
    if (!first) return;
    first.explanation.subqueries.forEach((sq, j) => {
      const chip = el("span", "chip");
      const swatch = document.createElement("i");
      swatch.style.background = COLOURS[j % COLOURS.length];
      const textQuery = !byFile && s.like === "";
      chip.append(swatch, document.createTextNode(sq.full_query && textQuery ? "full query" : sq.text));
      legend.append(chip);
    });
  }

  function card(hit) {
    const article = el("article", "result");
    article.dataset.id = hit.id;
    article.dataset.shard = hit.shard === undefined || hit.shard === null ? "" : String(hit.shard);
    article.tabIndex = 0;
    article.setAttribute("aria-label", "#" + (hit.rank + 1) + " " + hit.name + ", score " + hit.score.toFixed(3));
    const figure = el("figure", "thumb");
    const img = document.createElement("img");
    img.alt = hit.name;
    loadImage(img, hit.thumbnail);
    img.addEventListener("click", () => openDetails(article));
    const overlay = el("div", "overlay");
    if (hit.explanation) drawRegions(overlay, hit.explanation);
    figure.append(img, overlay);
    const caption = el("div", "caption");
    const name = el("span", "name", "#" + (hit.rank + 1) + " " + hit.name);
    name.title = hit.name + " (id " + hit.id + ")";
    caption.append(name, el("span", "score", hit.score.toFixed(3)));
    const actions = el("div", "actions");
    const like = el("button", "action like", "More like this");
    like.type = "button";
    like.tabIndex = -1;  // the card has the keys (m, o, Enter); Tab moves card to card
    like.addEventListener("click", () => moreLike(hit.id, article.dataset.shard));
    const open = el("a", "action open", "Open");
    open.href = imageUrl(hit.id, article.dataset.shard, true);
    open.target = "_blank";
    open.rel = "noopener";
    open.tabIndex = -1;
    open.addEventListener("click", (event) => openFull(event, hit.id, article.dataset.shard));
    const info = el("button", "action info", "Details");
    info.type = "button";
    info.tabIndex = -1;
    info.addEventListener("click", () => openDetails(article));
    actions.append(like, open, info);
    article.append(figure, caption, actions);
    if (hit.taken) article.title = "taken " + hit.taken;
    return article;
  }

  function drawRegions(overlay, e) {
    const [w, h] = e.image_size;
    let drawn = 0;
    e.subqueries.forEach((sq, j) => {
      if (!sq.best || !w || !h) return;
      const [x0, y0, x1, y1] = sq.best.box;
      const box = el("div", "box" + (sq.full_query ? " full-query" : ""));
      box.dataset.subquery = sq.text;
      box.style.setProperty("--c", COLOURS[j % COLOURS.length]);
      box.style.left = (100 * x0 / w) + "%";
      box.style.top = (100 * y0 / h) + "%";
      box.style.width = (100 * (x1 - x0) / w) + "%";
      box.style.height = (100 * (y1 - y0) / h) + "%";
      const label = el("span", "label", sq.text + " " + sq.best.score.toFixed(2));
      box.title = sq.text + ": " + sq.best.score.toFixed(3) + " (level " + sq.best.level + ", ~" + sq.best.granularity + " segments)";
      box.append(label);
      overlay.append(box);
      drawn += 1;
    });
    if (!drawn) {
      overlay.append(el("span", "note", "whole-image match " + e.global_score.toFixed(3) + (e.mode === "global" ? " (global mode)" : "")));
    }
  }

  async function loadImage(img, url) {
    if (!apiKey) { img.src = url; return; }
    try {  // with an API key the image needs the header, which <img src> cannot send
      const response = await fetch(url, { headers: headers() });
      if (!response.ok) return;
      const blobUrl = URL.createObjectURL(await response.blob());
      blobUrls.push(blobUrl);
      img.src = blobUrl;
    } catch (e) { /* leave the image empty */ }
  }

  async function openFull(event, id, shard) {
    if (!apiKey) return;  // a plain link does
    event.preventDefault();
    const tab = window.open("", "_blank");
    try {
      const response = await fetch(imageUrl(id, shard, true), { headers: headers() });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const blobUrl = URL.createObjectURL(await response.blob());
      if (tab) tab.location = blobUrl; else location.assign(blobUrl);
    } catch (err) {
      if (tab) tab.close();
      setStatus("cannot open image " + id + ": " + err.message, true);
    }
  }

  // ------------------------------------------------------------------ details panel
  function row(term, value) {
    if (value === null || value === undefined || value === "") return;
    detailsList.append(el("dt", "", term), el("dd", "", String(value)));
  }

  async function openDetails(article) {
    const id = article.dataset.id, shard = article.dataset.shard || "";
    detailsFor = article;
    details.dataset.shard = shard;
    details.hidden = false;
    details.dataset.id = id;
    $("details-title").textContent = "image " + id;
    detailsList.replaceChildren();
    detailsImage.removeAttribute("src");
    detailsOpen.href = imageUrl(id, shard, true);
    try {
      const d = await api(imageUrl(id, shard, false));
      if (details.dataset.id !== id) return;
      $("details-title").textContent = d.name;
      loadImage(detailsImage, d.thumbnail);
      detailsImage.alt = d.name;
      row("Path", d.path);
      row("Size", d.width && d.height ? d.width + " \u00d7 " + d.height + " px" + (d.orientation ? ", " + d.orientation : "") : "");
      row("Taken", d.taken ? d.taken.replace("T", " ") + (d.taken_source === "exif" ? " (EXIF)" : " (file date: no EXIF date)") : "unknown");
      row("Camera", [d.make, d.model].filter(Boolean).join(" \u00b7 ") || "unknown (no EXIF)");
      row("EXIF orientation", d.exif_orientation);
      row("File size", d.bytes ? (d.bytes / 1024).toFixed(1) + " KiB" : "");
      row("Id", d.id);
      details.dataset.ready = "1";
    } catch (err) {
      row("Error", err.message);
    }
    $("details-close").focus();
  }

  function closeDetails(refocus) {
    if (details.hidden) return;
    details.hidden = true;
    delete details.dataset.ready;
    delete details.dataset.id;
    if (refocus && detailsFor && detailsFor.isConnected) detailsFor.focus();
    detailsFor = null;
  }

  // ------------------------------------------------------------------ keyboard
  function cards() { return [...results.querySelectorAll(".result")]; }

  function columns(list) {
    if (!list.length) return 1;
    const top = list[0].offsetTop;
    const n = list.filter((c) => c.offsetTop === top).length;
    return Math.max(1, n);
  }

  function move(from, key) {
    const list = cards();
    const i = list.indexOf(from), cols = columns(list);
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, ArrowDown: i + cols, ArrowUp: i - cols, Home: 0, End: list.length - 1 }[key];
    if (to === undefined) return false;
    if (key === "ArrowUp" && to < 0) { query.focus(); return true; }
    const target = list[Math.max(0, Math.min(list.length - 1, to))];
    if (target) { target.focus(); target.scrollIntoView({ block: "nearest" }); }
    return true;
  }

  function typing(target) {
    return target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA");
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (event.key === "Escape" && !details.hidden) { event.preventDefault(); closeDetails(true); return; }
    if (target === query && event.key === "ArrowDown" && cards().length) { event.preventDefault(); cards()[0].focus(); return; }
    if (typing(target)) return;
    if (event.key === "/") { event.preventDefault(); query.focus(); query.select(); return; }
    if (event.key === "]" && !nextPage.disabled && !pager.hidden) { event.preventDefault(); nextPage.click(); return; }
    if (event.key === "[" && !prevPage.disabled && !pager.hidden) { event.preventDefault(); prevPage.click(); return; }
    const cardEl = target && target.classList && target.classList.contains("result") ? target : null;
    if (!cardEl) return;
    if (event.key === "Enter") { event.preventDefault(); openDetails(cardEl); return; }
    if (event.key === "m") { event.preventDefault(); moreLike(cardEl.dataset.id, cardEl.dataset.shard); return; }
    if (event.key === "o") { event.preventDefault(); cardEl.querySelector(".open").click(); return; }
    if (move(cardEl, event.key)) event.preventDefault();
  });

  // ------------------------------------------------------------------ wiring
  function filterReset() {
    const s = { threshold: "" };
    FILTERS.forEach((f) => { s[f] = ""; });
    return s;
  }

  function clearFilters() {
    FILTERS.forEach((f) => { $("f-" + f).value = ""; });
    threshold.value = "";
  }

  async function loadStats() {
    try {
      stats = await api("api/stats");
      authBox.hidden = true;
      mode.replaceChildren(...stats.modes.map((m) => new Option(m, m, false, m === stats.default_mode)));
      const seg = stats.segments ? ", segments " + stats.segments.levels.join("/") : ", global vectors only";
      $("index-info").textContent = stats.images + " images, encoder " + stats.encoder + seg;
      kInput.max = stats.limits.max_k;
      query.maxLength = stats.limits.max_query_chars;
      restore(history.state || fromUrl(location.search));
      document.body.dataset.ready = "1";
    } catch (err) {
      $("index-info").textContent = "";
      setStatus(err.message, true);
    }
  }

  function restore(s) {  // a URL's search (loaded, shared, or reached with back/forward): shown and run again
    showState(s);
    if (s.q !== "" || s.like !== "") run(s, { history: "replace" });
    else welcome();
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); searchFromForm(); });
  query.addEventListener("input", updateBadge);
  literal.addEventListener("change", updateBadge);
  $("clear-filters").addEventListener("click", () => {
    clearFilters();
    if (current && current.data) rerun(Object.assign(filterReset(), { offset: "0" }));
  });
  prevPage.addEventListener("click", () => {
    if (!current) return;
    const k = parseInt(current.state.k, 10) || 12, offset = parseInt(current.state.offset, 10) || 0;
    rerun({ offset: String(Math.max(0, offset - k)) });
  });
  nextPage.addEventListener("click", () => {
    if (!current) return;
    const k = parseInt(current.state.k, 10) || 12, offset = parseInt(current.state.offset, 10) || 0;
    rerun({ offset: String(offset + k) });
  });
  window.addEventListener("popstate", (event) => { restore(event.state || fromUrl(location.search)); });
  $("details-close").addEventListener("click", () => closeDetails(true));
  detailsLike.addEventListener("click", () => { if (details.dataset.id) moreLike(details.dataset.id, details.dataset.shard); });
  detailsOpen.addEventListener("click", (event) => {
    if (details.dataset.id) openFull(event, details.dataset.id, details.dataset.shard);
  });

  function searchFile(file) {
    if (!file) return;
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    const s = formState();
    s.q = "";
    s.offset = "0";
    run(s, { file: file });
  }

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
    // Results fetched without explanations: fetch them again, explained (same page, no new history entry).
    if (toggle.checked && current && results.dataset.explained === "0") {
      run(current.state, { file: current.file, history: current.file ? null : "replace" });
    }
  });
  mode.addEventListener("change", () => rerun({ mode: mode.value, offset: "0" }));
  authBox.addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = keyInput.value.trim();
    sessionStorage.setItem("finegrain-api-key", apiKey);
    loadStats();
  });

  document.body.classList.toggle("show-overlay", toggle.checked);
  loadStats();
})();
