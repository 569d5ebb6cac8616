/* mrantool viewer: the cohort table, the slide in OpenSeadragon, attention overlays, click-to-find-similar. */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const state = {
    slides: [], sort: { key: "slide_id", dir: 1 }, info: null, cohort: null,
    overlayEl: null, outlineEl: null, marks: [], pendingFocus: null, overlayLoaded: false,
  };

  const viewer = OpenSeadragon({
    id: "osd",
    prefixUrl: "/static/openseadragon/images/",
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    gestureSettingsMouse: { clickToZoom: false },
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    animationTime: 0.5,
  });

  function status(text) { $("status").textContent = text || ""; }

  async function getJSON(url) {
    const response = await fetch(url);
    const body = await response.json();
    if (!response.ok) { throw new Error(body.error || response.statusText); }
    return body;
  }

  function fmtProb(p) { return p === null || p === undefined ? "" : p.toFixed(3); }

  /* ---- cohort table ---- */
  function renderTable() {
    const { key, dir } = state.sort;
    const rows = [...state.slides].sort((a, b) => {
      const x = a[key], y = b[key];
      if (x === y) { return a.slide_id < b.slide_id ? -1 : 1; }
      if (x === null || x === "") { return 1; }
      if (y === null || y === "") { return -1; }
      return (x < y ? -1 : 1) * dir;
    });
    const body = document.querySelector("#slides tbody");
    body.innerHTML = "";
    for (const row of rows) {
      const tr = document.createElement("tr");
      tr.dataset.slide = row.slide_id;
      if (state.info && state.info.slide_id === row.slide_id) { tr.classList.add("current"); }
      const cells = [row.slide_id, row.label, row.predicted, fmtProb(row.probability)];
      cells.forEach((text, i) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (i === 2 && row.label && row.predicted && row.label !== row.predicted) { td.classList.add("wrong"); }
        tr.appendChild(td);
      });
      tr.addEventListener("click", () => openSlide(row.slide_id));
      body.appendChild(tr);
    }
    document.querySelectorAll("#slides th").forEach((th) => {
      th.classList.toggle("sorted-asc", th.dataset.key === key && dir === 1);
      th.classList.toggle("sorted-desc", th.dataset.key === key && dir === -1);
    });
  }

  document.querySelectorAll("#slides th").forEach((th) => th.addEventListener("click", () => {
    const key = th.dataset.key;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : (key === "probability" ? -1 : 1) };
    renderTable();
  }));

  async function loadCohort() {
    state.cohort = await getJSON("/api/cohort");
    state.slides = state.cohort.slides;
    const notes = [];
    if (!state.cohort.run) { notes.push("No --run: no predictions or attention."); }
    if (!state.cohort.index) { notes.push("No --index: similar-patch search is off."); }
    $("cohort-note").textContent = `${state.slides.length} slides. ${notes.join(" ")}`;
    renderTable();
    const wanted = new URLSearchParams(window.location.search).get("slide");
    const first = state.slides.find((s) => s.slide_id === wanted) || state.slides[0];
    if (first) { openSlide(first.slide_id); }
  }

  /* ---- the slide ---- */
  function item() { return viewer.world.getItemAt(0); }

  function imageRect(x, y, w, h) { return item().imageToViewportRectangle(x, y, w, h); }

  async function openSlide(slideId, focus) {
    status(`opening ${slideId}…`);
    let info;
    try {
      info = await getJSON(`/api/slides/${encodeURIComponent(slideId)}`);
    } catch (err) {
      status(err.message);
      return;
    }
    state.info = info;
    state.pendingFocus = focus || null;
    state.overlayEl = null;
    state.outlineEl = null;
    state.marks = [];
    $("slide-title").textContent = info.slide_id;
    const meta = [];
    if (info.label) { meta.push(`label ${info.label}`); }
    if (info.predicted) { meta.push(`predicted ${info.predicted} (p = ${fmtProb(info.probability)})`); }
    meta.push(`${info.width}×${info.height} px at ${info.mpp.toFixed(3)} µm/px`);
    $("slide-meta").textContent = meta.join(" · ");
    renderLevels(info);
    renderTable();
    history.replaceState(null, "", `?slide=${encodeURIComponent(info.slide_id)}`);
    viewer.open(info.dzi);
  }

  viewer.addHandler("open", () => {
    viewer.clearOverlays();
    const info = state.info;
    const outline = document.createElement("img");
    outline.className = "tissue-outline";
    outline.src = `/api/slides/${encodeURIComponent(info.slide_id)}/tissue.svg`;
    outline.alt = "";
    state.outlineEl = outline;
    viewer.addOverlay({ element: outline, location: imageRect(0, 0, info.width, info.height) });
    outline.style.display = $("outline-toggle").checked ? "" : "none";
    updateOverlay();
    if (state.pendingFocus) {
      const f = state.pendingFocus;
      const pad = f.side * 3;
      viewer.viewport.fitBounds(imageRect(f.x - pad, f.y - pad, f.side + 2 * pad, f.side + 2 * pad), true);
      mark(f, "hit-mark");
      state.pendingFocus = null;
    }
    status("");
  });

  viewer.addHandler("open-failed", (event) => status(`could not open the slide: ${event.message}`));

  /* ---- attention ---- */
  function renderLevels(info) {
    const box = $("levels");
    box.innerHTML = "";
    const levels = info.attention_levels;
    const previous = document.querySelector("input[name=level]:checked");
    const keep = previous ? previous.value : null;
    levels.forEach((level) => {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio";
      input.name = "level";
      input.value = level;
      input.checked = level === keep || (!levels.includes(keep) && level === (levels.includes("patch") ? "patch" : levels[0]));
      input.addEventListener("change", updateOverlay);
      label.append(input, ` ${level}`);
      box.appendChild(label);
    });
    $("overlay-toggle").disabled = levels.length === 0;
    $("attention-note").textContent = levels.length ? `head ${info.head}` : "No attention for this slide (start the viewer with --run).";
  }

  async function updateOverlay() {
    const info = state.info;
    if (!info || !item()) { return; }
    const on = $("overlay-toggle").checked && info.attention_levels.length > 0;
    const checked = document.querySelector("input[name=level]:checked");
    if (!on || !checked) {
      if (state.overlayEl) { state.overlayEl.style.display = "none"; }
      $("legend").hidden = true;
      return;
    }
    const level = checked.value;
    const scale = $("scale").value;
    const base = `/api/slides/${encodeURIComponent(info.slide_id)}/attention/${level}`;
    let legend;
    try {
      legend = await getJSON(`${base}.json?scale=${scale}`);
    } catch (err) {
      status(err.message);
      return;
    }
    if (state.info !== info) { return; }
    let el = state.overlayEl;
    if (!el) {
      el = document.createElement("img");
      el.className = "attention-overlay";
      el.id = "attention-overlay";
      el.alt = "";
      state.overlayEl = el;
      viewer.addOverlay({ element: el, location: imageRect(0, 0, legend.width_l0, legend.height_l0) });
    } else {
      viewer.updateOverlay(el, imageRect(0, 0, legend.width_l0, legend.height_l0));
    }
    state.overlayLoaded = false;
    el.onload = () => { state.overlayLoaded = true; };
    el.src = `${base}.png?scale=${scale}`;
    el.dataset.level = level;
    el.style.display = "";
    el.style.opacity = $("opacity").value / 100;
    renderLegend(legend);
  }

  function renderLegend(legend) {
    $("legend").hidden = false;
    $("legend-bar").style.background = `linear-gradient(to right, ${legend.colors.join(", ")})`;
    const ticks = $("legend-ticks");
    ticks.innerHTML = "";
    legend.ticks.forEach((t) => {
      const span = document.createElement("span");
      span.style.left = `${t.at * 100}%`;
      span.textContent = t.label;
      ticks.appendChild(span);
    });
    $("legend-title").textContent = legend.title;
  }

  $("overlay-toggle").addEventListener("change", updateOverlay);
  $("scale").addEventListener("change", updateOverlay);
  $("opacity").addEventListener("input", () => {
    if (state.overlayEl) { state.overlayEl.style.opacity = $("opacity").value / 100; }
  });
  $("outline-toggle").addEventListener("change", () => {
    if (state.outlineEl) { state.outlineEl.style.display = $("outline-toggle").checked ? "" : "none"; }
  });

  /* ---- similar patches ---- */
  function mark(box, kind) {
    const node = el("div", undefined, `mark ${kind}`);
    viewer.addOverlay({ element: node, location: imageRect(box.x, box.y, box.side, box.side) });
    state.marks.push(node);
  }

  function clearMarks() {
    state.marks.forEach((node) => viewer.removeOverlay(node));
    state.marks = [];
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) { node.textContent = text; }
    if (className) { node.className = className; }
    return node;
  }

  function card(entry, ...caption) {
    const img = el("img");
    img.src = entry.image;
    img.alt = `${entry.slide_id} bag ${entry.bag} patch ${entry.patch}`;
    const title = el("div");
    title.append(el("b", entry.slide_id));
    if (entry.label) { title.append(" ", el("span", entry.label, "label-chip")); }
    const text = el("div");
    text.append(title, el("div"));
    text.lastChild.append(...caption);
    return [img, text];
  }

  async function findSimilar(x, y) {
    const info = state.info;
    if (!info.similar) {
      status("Start the viewer with --index to find similar patches.");
      return;
    }
    const k = Math.max(1, Math.min(50, parseInt($("k").value, 10) || 6));
    const other = $("other-slides").checked ? 1 : 0;
    status("searching…");
    let result;
    try {
      result = await getJSON(`/api/slides/${encodeURIComponent(info.slide_id)}/similar?x=${x}&y=${y}&k=${k}&other=${other}`);
    } catch (err) {
      status(err.message);
      return;
    }
    status(result.message || "");
    if (!result.query) { return; }
    clearMarks();
    mark(result.query, "query-mark");
    const query = $("similar-query");
    query.innerHTML = "";
    query.append(...card(result.query, `query: bag ${result.query.bag}, patch ${result.query.patch}`));
    const list = $("similar-hits");
    list.innerHTML = "";
    result.hits.forEach((hit, i) => {
      const li = document.createElement("li");
      li.className = "hit";
      li.dataset.slide = hit.slide_id;
      li.append(...card(hit, `#${i + 1} `, el("span", `similarity ${hit.similarity.toFixed(3)}`, "sim")));
      li.addEventListener("click", () => openSlide(hit.slide_id, hit));
      list.appendChild(li);
    });
    $("similar-panel").classList.add("open");
  }

  viewer.addHandler("canvas-click", (event) => {
    if (!event.quick || !state.info || !item()) { return; }
    const p = viewer.viewport.viewerElementToImageCoordinates(event.position);
    findSimilar(Math.round(p.x), Math.round(p.y));
  });

  /* ---- hooks for tests and scripts ---- */
  window.mrantool = {
    viewer,
    state,
    openSlide,
    imageToElement(x, y) {
      const p = viewer.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
      return [p.x, p.y];
    },
    ready() {
      const it = item();
      const overlayWanted = $("overlay-toggle").checked && state.info && state.info.attention_levels.length > 0;
      return Boolean(it && it.getFullyLoaded() && (!overlayWanted || state.overlayLoaded));
    },
  };

  loadCohort().catch((err) => status(err.message));
})();
