// vae-serve demo page: plain JavaScript over the public /v1 API (see docs/api.md). No build step, no dependencies.
"use strict";

(() => {
  const $ = (selector, root = document) => root.querySelector(selector);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const KEY_STORAGE = "vae-serve.api-key"; // sessionStorage: forgotten when the tab closes
  const SAMPLE_N = 36; // a 6 x 6 grid
  const SCORE_K = 100; // importance samples for log p(x)
  // The "typical / unusual" reading: -log p(x) against the card's test NLL (an average over the test set).
  const TYPICAL_RATIO = 0.25; // up to 25 % more nats than the test average: typical
  const UNUSUAL_RATIO = 0.5; // more than 50 % more: unusual; in between: somewhat unusual
  const MAP_HINT = "Each tile decodes one point of a 2-D plane in latent space.";

  const state = {
    models: [],
    model: null, // the selected ModelInfo from GET /v1/models
    manifold: null, // the last /v1/manifold answer for the selected model
    cursor: null, // keyboard cursor on the map: {row, col}
    posterior: null, // {mu, logvar} of the drawing, for its marker on the map
    tickets: {}, // section -> number of its latest request; older answers are dropped
  };

  // -- API -------------------------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(endpoint, status, code, detail) {
      super(detail);
      this.endpoint = endpoint;
      this.status = status;
      this.code = code;
      this.detail = detail;
    }

    describe() {
      const where = this.status ? `${this.endpoint} answered ${this.status} (${this.code})` : this.endpoint;
      return `${where}: ${this.detail}`;
    }
  }

  function apiKey() {
    return $("#api-key").value.trim();
  }

  // fetch `path` (relative to the page, so a reverse-proxy prefix keeps working); throws ApiError with the
  // server's JSON `detail` for every non-2xx answer.
  async function api(method, path, { query, json, form } = {}) {
    const url = new URL(path, document.baseURI);
    for (const [name, value] of Object.entries(query || {})) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
    }
    const endpoint = `${method} ${url.pathname}`;
    const headers = {};
    const key = apiKey();
    if (key) {
      if (!/^[\x21-\x7e]+$/.test(key)) {
        throw new ApiError(endpoint, 0, "bad_key", "the API key may only hold printable ASCII characters");
      }
      headers["X-API-Key"] = key;
    }
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form; // the browser sets the multipart boundary
    }
    let response;
    try {
      response = await fetch(url, { method, headers, body });
    } catch (err) {
      throw new ApiError(endpoint, 0, "network_error", `cannot reach the server (${err.message})`);
    }
    if (!response.ok) {
      let code = `http_${response.status}`;
      let detail = response.statusText || "request failed";
      try {
        const data = await response.json();
        if (data && data.detail !== undefined) {
          detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
          code = data.code || code;
        }
      } catch {
        // not JSON (e.g. a proxy's HTML page): keep the status text
      }
      throw new ApiError(endpoint, response.status, code, detail);
    }
    return response;
  }

  function formWith(fields, images) {
    const form = new FormData();
    images.forEach((blob, i) => form.append("image", blob, `image-${i}.png`));
    for (const [name, value] of Object.entries(fields)) {
      if (value !== undefined && value !== null) form.append(name, String(value));
    }
    return form;
  }

  // -- page helpers ----------------------------------------------------------------------------------------------
  function ticket(section) {
    state.tickets[section] = (state.tickets[section] || 0) + 1;
    const mine = state.tickets[section];
    return () => state.tickets[section] === mine; // still the latest?
  }

  function setStatus(section, text) {
    $(`#${section}-status`).textContent = text;
  }

  function showError(section, err) {
    const box = $(`#${section}-error`);
    if (!err) {
      box.hidden = true;
      box.textContent = "";
      $(`#${section}`)?.removeAttribute("data-error");
      return;
    }
    const text = err instanceof ApiError ? err.describe() : String(err.message || err);
    box.textContent = text;
    box.hidden = false;
    $(`#${section}`)?.setAttribute("data-error", err.code || "error");
  }

  function setBusy(section, busy) {
    const el = $(`#${section}`);
    el.setAttribute("aria-busy", busy ? "true" : "false");
    if (busy) el.dataset.state = "busy";
  }

  function done(section, started, what) {
    setBusy(section, false);
    $(`#${section}`).dataset.state = "done";
    setStatus(section, `${what} in ${Math.round(performance.now() - started)} ms`);
  }

  function failed(section, err) {
    setBusy(section, false);
    $(`#${section}`).dataset.state = "error";
    setStatus(section, "");
    showError(section, err);
  }

  function fmt(value, digits = 2) {
    return Number.isFinite(value) ? value.toFixed(digits).replace("-", "−") : "—";
  }

  function num(value) {
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }

  function randomSeed() {
    return Math.floor(Math.random() * 1e9);
  }

  function canvasBlob(canvas) {
    return new Promise((resolve, reject) => {
      canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("cannot read the canvas"))), "image/png");
    });
  }

  async function blobToImage(blob) {
    const url = URL.createObjectURL(blob);
    try {
      const img = new Image();
      img.src = url;
      await img.decode();
      return img;
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  // False, with a word in the section, while no model is loaded (e.g. the API key is missing).
  function connected(section) {
    if (state.model) return true;
    setStatus(section, "No model loaded: connect to the server first (see the message at the top).");
    return false;
  }

  function isVae() {
    return state.model && state.model.kind === "vae";
  }

  // -- drawing pads ------------------------------------------------------------------------------------------------
  class Pad {
    // onStroke: after each stroke; onDrop: after a file is dropped on the pad.
    constructor(canvas, { onStroke, onDrop } = {}) {
      this.canvas = canvas;
      this.ctx = canvas.getContext("2d");
      this.onStroke = onStroke;
      this.inked = false;
      this.last = null;
      this.clear();
      canvas.addEventListener("pointerdown", (e) => this.down(e));
      canvas.addEventListener("pointermove", (e) => this.move(e));
      for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
        canvas.addEventListener(type, () => this.up());
      }
      canvas.addEventListener("dragover", (e) => e.preventDefault());
      canvas.addEventListener("drop", (e) => {
        e.preventDefault();
        const file = e.dataTransfer && e.dataTransfer.files[0];
        if (!file) return;
        this.loadFile(file).then(
          () => onDrop && onDrop(),
          (err) => showError(canvas.closest("section").id, err),
        );
      });
    }

    brush() {
      // The brush slider is in pixels of a 280-px canvas.
      return Number($("#brush").value) * (this.canvas.width / 280);
    }

    point(e) {
      const rect = this.canvas.getBoundingClientRect();
      return {
        x: ((e.clientX - rect.left) * this.canvas.width) / rect.width,
        y: ((e.clientY - rect.top) * this.canvas.height) / rect.height,
      };
    }

    down(e) {
      if (e.pointerType === "mouse" && e.button !== 0) return;
      e.preventDefault();
      this.canvas.setPointerCapture(e.pointerId);
      this.last = this.point(e);
      this.segment(this.last, this.last);
    }

    move(e) {
      if (!this.last) return;
      const events = typeof e.getCoalescedEvents === "function" ? e.getCoalescedEvents() : [];
      for (const ev of events.length ? events : [e]) {
        const p = this.point(ev);
        this.segment(this.last, p);
        this.last = p;
      }
    }

    up() {
      if (!this.last) return;
      this.last = null;
      if (this.onStroke) this.onStroke();
    }

    segment(a, b) {
      const ctx = this.ctx;
      ctx.strokeStyle = "#fff";
      ctx.lineWidth = this.brush();
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x + 0.01, b.y); // a zero-length line draws nothing; a dot needs a hair of length
      ctx.stroke();
      this.inked = true;
    }

    clear() {
      this.ctx.fillStyle = "#000";
      this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
      this.inked = false;
    }

    // Draw `source` (an image or a canvas) to fit the pad, centred on black; pixel art stays sharp.
    drawImage(source, width, height) {
      this.clear();
      const scale = Math.min(this.canvas.width / width, this.canvas.height / height);
      const w = width * scale;
      const h = height * scale;
      this.ctx.imageSmoothingEnabled = scale < 1 || !Number.isInteger(scale);
      this.ctx.imageSmoothingQuality = "high";
      this.ctx.drawImage(source, (this.canvas.width - w) / 2, (this.canvas.height - h) / 2, w, h);
      this.ctx.imageSmoothingEnabled = true;
      this.inked = true;
    }

    async loadFile(file) {
      let img;
      try {
        img = await blobToImage(file);
      } catch {
        throw new Error(`cannot read ${file.name || "the file"} as an image (use a PNG or JPEG)`);
      }
      this.drawImage(img, img.naturalWidth, img.naturalHeight);
    }

    copyFrom(pad) {
      this.clear();
      this.ctx.drawImage(pad.canvas, 0, 0, this.canvas.width, this.canvas.height);
      this.inked = pad.inked;
    }

    blob() {
      return canvasBlob(this.canvas);
    }
  }

  // -- model picker and card ------------------------------------------------------------------------------------
  async function loadModels() {
    const select = $("#model-select");
    const check = ticket("models");
    showError("global", null);
    let data;
    try {
      data = await (await api("GET", "v1/models")).json();
    } catch (err) {
      if (!check()) return;
      select.disabled = true;
      select.innerHTML = "<option>not connected</option>";
      state.model = null;
      renderCard();
      showError("global", err);
      if (err.status === 503) setTimeout(() => check() && loadModels(), 2000); // still warming up: retry
      return;
    }
    if (!check()) return;
    state.models = data.models;
    renderComparePairs();
    const previous = state.model && state.model.name;
    select.innerHTML = "";
    for (const m of data.models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.default ? `${m.name} (default)` : m.name;
      select.append(option);
    }
    select.disabled = false;
    const names = data.models.map((m) => m.name);
    select.value = names.includes(previous) ? previous : data.default;
    selectModel(select.value);
  }

  function selectModel(name) {
    state.model = state.models.find((m) => m.name === name) || null;
    state.manifold = null;
    state.cursor = null;
    state.posterior = null;
    renderCard();
    resetResults();
    if (!state.model) return;
    document.body.dataset.model = state.model.name;
    loadSamples();
    loadManifold();
    if (pads.main.inked) analyze();
  }

  function renderCard() {
    const m = state.model;
    const set = (id, text) => {
      $(id).textContent = text;
    };
    if (!m) {
      for (const id of ["#card-dataset", "#card-latent", "#card-nll", "#card-decoder", "#card-input"]) set(id, "—");
      $("#model-card").removeAttribute("data-model");
      return;
    }
    const dataset = m.dataset || {};
    const metrics = m.metrics || {};
    const trainImages = num(dataset.train_images);
    set("#card-dataset", (dataset.name || "unknown") + (trainImages ? ` (${trainImages.toLocaleString("en")} training images)` : ""));
    set("#card-latent", `${m.latent_dim}` + (m.kind === "ae" ? " (plain autoencoder)" : ""));
    const nll = num(metrics.test_nll);
    const bpd = num(metrics.test_bits_per_dim);
    set(
      "#card-nll",
      nll === null
        ? "not evaluated"
        : `${fmt(nll)} nats` + (bpd !== null ? ` · ${fmt(bpd, 3)} bits/dim` : "") + (metrics.nll_k ? ` (k = ${metrics.nll_k})` : ""),
    );
    const decoders = { bernoulli: "Bernoulli (binary pixels)", gaussian: "Gaussian (continuous pixels)" };
    set("#card-decoder", decoders[m.likelihood] || m.likelihood);
    const [c, h, w] = m.input_shape;
    set("#card-input", `${w}×${h}, ${c === 1 ? "grayscale" : `${c} channels`}`);
    $("#model-card").dataset.model = m.name;
    $("#model-card").title = m.description || "";
    $("#input-size").textContent = `${w}×${h}`;
    const small = $("#input-small");
    small.width = w;
    small.height = h;
  }

  function resetResults() {
    for (const section of ["analyze", "samples", "map", "interp"]) {
      showError(section, null);
      setStatus(section, "");
      delete $(`#${section}`).dataset.state;
    }
    for (const id of ["#recon-img", "#map-decoded"]) $(id).removeAttribute("src");
    for (const id of ["#sample-grid", "#interp-strip"]) $(id).replaceChildren();
    $("#latent-chart").replaceChildren();
    $("#latent-chart").setAttribute("aria-label", "Latent code (not computed yet)");
    renderScore(null);
    $("#map-overlay").replaceChildren();
    delete $("#map-overlay").dataset.point;
    const map = $("#map-canvas"); // no stale map from the previous model, even when this one has none
    map.width = 1;
    map.height = 1;
    map.parentElement.style.aspectRatio = "";
    $("#map-basis").textContent = MAP_HINT;
    $("#map-point").textContent = "Click the map";
    delete $("#map").dataset.decoded;
    const vae = isVae();
    $("#new-samples").disabled = state.model ? !vae : false;
    $("#use-sample").disabled = state.model ? !vae : false;
  }

  // -- draw -> reconstruct, encode, score ---------------------------------------------------------------------------
  function updateSmallInput() {
    const small = $("#input-small");
    const ctx = small.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(pads.main.canvas, 0, 0, small.width, small.height);
  }

  async function analyze() {
    if (!connected("analyze")) return;
    const check = ticket("analyze");
    const model = state.model.name;
    const started = performance.now();
    showError("analyze", null);
    setBusy("analyze", true);
    setStatus("analyze", "Reconstructing…");
    updateSmallInput();
    let blob;
    try {
      blob = await pads.main.blob();
    } catch (err) {
      failed("analyze", err);
      return;
    }
    const calls = [
      api("POST", "v1/reconstruct", { form: formWith({ model, seed: 0, encoding: "png" }, [blob]) })
        .then((r) => r.json())
        .then((data) => check() && renderReconstruction(data)),
      api("POST", "v1/encode", { form: formWith({ model }, [blob]) })
        .then((r) => r.json())
        .then((data) => check() && renderLatent(data.results[0])),
    ];
    if (isVae()) {
      calls.push(
        api("POST", "v1/score", { form: formWith({ model, k: SCORE_K, seed: 0 }, [blob]) })
          .then((r) => r.json())
          .then((data) => check() && renderScore(data.results[0])),
      );
    } else {
      renderScore(null, "no likelihood: plain autoencoder");
    }
    const outcomes = await Promise.allSettled(calls);
    if (!check()) return;
    const errors = outcomes.filter((o) => o.status === "rejected").map((o) => o.reason);
    if (errors.length) {
      const unique = [...new Set(errors.map((e) => (e instanceof ApiError ? e.describe() : String(e.message || e))))];
      const combined = new Error(unique.join("\n"));
      combined.code = errors[0].code || "error";
      failed("analyze", combined);
      return;
    }
    done("analyze", started, "Reconstructed, encoded and scored");
  }

  function renderReconstruction(data) {
    const img = $("#recon-img");
    img.src = `data:image/png;base64,${data.images[0]}`;
    img.alt = `Reconstruction by ${data.model}`;
    const r = data.results[0];
    $("#score-elbo").textContent = `${fmt(r.elbo)} nats`;
    $("#score-terms").textContent = `${fmt(r.recon)} · ${fmt(r.kl)}`;
  }

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (parent) parent.append(el);
    return el;
  }

  function renderLatent(posterior) {
    state.posterior = posterior;
    drawMapOverlay();
    const chart = $("#latent-chart");
    chart.replaceChildren();
    const mu = posterior.mu;
    const sd = posterior.logvar.map((v) => Math.exp(0.5 * v));
    const W = 240;
    const H = 120;
    const pad = 6;
    const limit = Math.max(2.5, ...mu.map((m, i) => Math.abs(m) + sd[i]));
    const y = (v) => H / 2 - (v / limit) * (H / 2 - pad);
    const step = (W - 2 * pad) / mu.length;
    const barW = Math.max(1, step * 0.7);
    svg("rect", { x: 0, y: y(1), width: W, height: y(-1) - y(1), class: "prior-band" }, chart);
    svg("line", { x1: 0, x2: W, y1: y(0), y2: y(0), class: "axis" }, chart);
    mu.forEach((m, i) => {
      const x = pad + i * step + (step - barW) / 2;
      const g = svg("g", {}, chart);
      svg("rect", { x, y: Math.min(y(0), y(m)), width: barW, height: Math.max(0.5, Math.abs(y(m) - y(0))), class: "bar" }, g);
      if (step >= 3) {
        const cx = x + barW / 2;
        svg("line", { x1: cx, x2: cx, y1: y(m - sd[i]), y2: y(m + sd[i]), class: "whisker" }, g);
      }
      svg("title", {}, g).textContent = `z${i + 1}: μ = ${fmt(m)}, σ = ${fmt(sd[i])}`;
    });
    const shown = mu.slice(0, 16).map((m, i) => `z${i + 1} ${fmt(m)} ± ${fmt(sd[i])}`);
    const more = mu.length > 16 ? `, and ${mu.length - 16} more` : "";
    chart.setAttribute("aria-label", `Latent code, ${mu.length} dimensions: ${shown.join(", ")}${more}`);
  }

  // The reading: -log p(x) against the card's test NLL. Returns {level, label, tip}.
  function judge(nll) {
    const metrics = (state.model && state.model.metrics) || {};
    const ref = num(metrics.test_nll);
    if (ref === null) {
      return { level: "unknown", label: "no reference", tip: "The model card records no test NLL, so there is nothing to compare this image with." };
    }
    const typical = ref + TYPICAL_RATIO * Math.abs(ref);
    const unusual = ref + UNUSUAL_RATIO * Math.abs(ref);
    const tip =
      `Compares this image's negative log-likelihood −log p(x) (importance-weighted, k = ${SCORE_K}) with the ` +
      `model's average on its test set, the card's test NLL of ${fmt(ref)} nats. Up to ${Math.round(TYPICAL_RATIO * 100)} % ` +
      `more (≤ ${fmt(typical)} nats): typical. Up to ${Math.round(UNUSUAL_RATIO * 100)} % more (≤ ${fmt(unusual)}): ` +
      `somewhat unusual. Beyond that: unusual, the model finds the image unlike its training data. Lower is always ` +
      `typical. Single images vary around the average, and mouse drawings are often thicker or less centred than ` +
      `the training images.`;
    if (nll <= typical) return { level: "typical", label: "typical", tip };
    if (nll <= unusual) return { level: "somewhat", label: "somewhat unusual", tip };
    return { level: "unusual", label: "unusual", tip };
  }

  function renderScore(score, note) {
    const badge = $("#reading");
    if (!score) {
      badge.textContent = note || "no score yet";
      badge.dataset.reading = "none";
      $("#score-ll").textContent = "—";
      $("#score-p").textContent = "—";
      if (!note) {
        $("#score-elbo").textContent = "—";
        $("#score-terms").textContent = "—";
      }
      return;
    }
    const nll = -score.log_likelihood;
    const reading = score.p_value == null ? judge(nll) : calibrated(score);
    badge.textContent = reading.label;
    badge.dataset.reading = reading.level;
    $("#reading-tip").textContent = reading.tip;
    $("#score-ll").textContent = `${fmt(score.log_likelihood)} nats (${fmt(score.bits_per_dim, 3)} bits/dim)`;
    $("#score-elbo").textContent = `${fmt(score.elbo)} nats`;
    $("#score-terms").textContent = `${fmt(score.recon)} · ${fmt(score.kl)}`;
    $("#score-p").textContent = score.p_value == null ? "— (model not calibrated)" : fmt(score.p_value, 3);
  }

  // The reading from the calibrated out-of-distribution score (docs/anomaly.md): its p-value against held-out images
  // like the training data, and the server's decision at its false-positive rate.
  function calibrated(score) {
    const share = Math.round(score.p_value * 1000) / 10;
    const tip =
      `The calibrated out-of-distribution score combines log p(x), the KL and reconstruction terms and the image's ` +
      `compressed size. p = ${fmt(score.p_value, 3)}: ${share} % of held-out images like the training data score ` +
      `at least this unusual. The server calls an image unusual when p is at or below its false-positive rate ` +
      `(5 % unless configured), so about 1 in 20 typical images is flagged too.`;
    return score.is_anomaly
      ? { level: "unusual", label: `unusual (p = ${fmt(score.p_value, 3)})`, tip }
      : { level: "typical", label: `typical (p = ${fmt(score.p_value, 3)})`, tip };
  }

  async function useSample() {
    if (!connected("analyze")) return;
    const check = ticket("analyze");
    showError("analyze", null);
    try {
      const query = { model: state.model.name, n: 1, seed: randomSeed() };
      const data = await (await api("GET", "v1/sample", { query })).json();
      if (!check()) return;
      await useImage(data.images[0]);
    } catch (err) {
      if (check()) failed("analyze", err);
    }
  }

  // Put a base64 PNG (a sample) on the drawing canvas and analyse it.
  async function useImage(b64) {
    const img = await blobToImage(base64Blob(b64));
    pads.main.drawImage(img, img.naturalWidth, img.naturalHeight);
    updateSmallInput();
    analyze();
  }

  // Tiles of base64 PNGs as <img> elements in `container`; with `onPick`, each tile is a button.
  function renderTiles(container, images, label, onPick) {
    container.replaceChildren();
    images.forEach((b64, i) => {
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${b64}`;
      img.alt = label(i);
      if (onPick) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "tile";
        button.title = "Use this sample as the drawing";
        button.append(img);
        button.tabIndex = i === 0 ? 0 : -1; // one tab stop for the grid; arrow keys move inside it
        button.addEventListener("click", () => onPick(b64));
        container.append(button);
      } else {
        img.className = "tile";
        container.append(img);
      }
    });
  }

  // Arrow keys (and Home / End) move the focus over a grid of tile buttons, `columns` wide (roving tabindex).
  function tileKeys(container, columns) {
    container.addEventListener("keydown", (e) => {
      const tiles = [...container.querySelectorAll("button.tile")];
      const i = tiles.indexOf(document.activeElement);
      if (i < 0) return;
      const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns, ArrowDown: columns, Home: -i, End: tiles.length - 1 - i };
      if (!(e.key in moves)) return;
      e.preventDefault();
      const next = tiles[Math.min(tiles.length - 1, Math.max(0, i + moves[e.key]))];
      tiles.forEach((t) => {
        t.tabIndex = t === next ? 0 : -1;
      });
      next.focus();
    });
  }

  // -- samples -----------------------------------------------------------------------------------------------------
  function sampleSeed() {
    const input = $("#seed");
    const value = Number(input.value);
    if (!Number.isInteger(value) || value < 0) {
      input.value = "0";
      return 0;
    }
    return value;
  }

  async function loadSamples() {
    if (!connected("samples")) return;
    const check = ticket("samples");
    if (!isVae()) {
      setStatus("samples", "A plain autoencoder has no prior to sample from.");
      return;
    }
    const seed = sampleSeed();
    const temperature = Number($("#temperature").value);
    const started = performance.now();
    showError("samples", null);
    setBusy("samples", true);
    try {
      const query = { model: state.model.name, n: SAMPLE_N, seed, temperature };
      const data = await (await api("GET", "v1/sample", { query })).json();
      if (!check()) return;
      const grid = $("#sample-grid");
      grid.dataset.seed = String(seed);
      grid.setAttribute("aria-label", `${SAMPLE_N} samples from ${data.model}, seed ${seed}, temperature ${temperature.toFixed(2)}; choose one to use it as the drawing`);
      renderTiles(grid, data.images, (i) => `sample ${i + 1}`, (b64) => useImage(b64).catch((err) => failed("analyze", err)));
      done("samples", started, `Seed ${seed}, temperature ${temperature.toFixed(2)}`);
    } catch (err) {
      if (check()) failed("samples", err);
    }
  }

  // -- latent-space map -------------------------------------------------------------------------------------------
  async function loadManifold() {
    if (!state.model) return;
    const check = ticket("map");
    const steps = Number($("#map-steps").value);
    const started = performance.now();
    showError("map", null);
    setBusy("map", true);
    try {
      const query = { model: state.model.name, steps, encoding: "png" };
      const data = await (await api("GET", "v1/manifold", { query })).json();
      const tiles = await Promise.all(data.images.map((b64) => blobToImage(base64Blob(b64))));
      if (!check()) return;
      const [, h, w] = state.model.input_shape;
      const canvas = $("#map-canvas");
      canvas.width = steps * w;
      canvas.height = steps * h;
      canvas.parentElement.style.aspectRatio = `${canvas.width} / ${canvas.height}`; // non-square inputs
      const ctx = canvas.getContext("2d");
      tiles.forEach((tile, k) => ctx.drawImage(tile, (k % steps) * w, Math.floor(k / steps) * h, w, h));
      state.manifold = { ...data, tileW: w, tileH: h };
      state.cursor = null;
      $("#map-overlay").setAttribute("viewBox", `0 0 ${canvas.width} ${canvas.height}`);
      $("#map-basis").textContent =
        data.basis === "prior"
          ? `The prior's plane: z₁ left to right, z₂ bottom to top, each from ${fmt(-data.span[0])} to ${fmt(data.span[0])} (the prior's central 90 %).`
          : `The plane of the two main directions of the training codes (principal components from the card's latent_stats)${spanInStddevs(data)}.`;
      drawMapOverlay();
      done("map", started, `${steps} × ${steps} points decoded`);
    } catch (err) {
      if (check()) failed("map", err);
    }
  }

  // ", ±1.645 standard deviations along each" when the card has the principal stddevs the span was made from.
  function spanInStddevs(data) {
    const stats = (state.model.card && state.model.card.latent_stats) || {};
    const sd = stats.principal_stddevs;
    if (!Array.isArray(sd) || sd.length < 2 || !(sd[0] > 0)) return "";
    return `, ±${fmt(data.span[0] / sd[0], 3)} standard deviations along each`;
  }

  function base64Blob(b64) {
    const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
    return new Blob([bytes], { type: "image/png" });
  }

  // Mirror of model/latent.py::manifold_grid: columns run from -span[0] to +span[0] along directions[0], rows from
  // +span[1] (top) to -span[1] (bottom) along directions[1]; tile centres sit exactly on the grid's codes.
  // (u, v) are in tiles from the map's top-left corner; returns plane coordinates (a, b) in [-1, 1] at tile centres.
  function planeCoords(u, v) {
    const steps = state.manifold.steps;
    const a = ((u - 0.5) / (steps - 1)) * 2 - 1;
    const b = -(((v - 0.5) / (steps - 1)) * 2 - 1);
    return { a, b };
  }

  function tileCoords(a, b) {
    const steps = state.manifold.steps;
    return { u: ((a + 1) / 2) * (steps - 1) + 0.5, v: ((1 - b) / 2) * (steps - 1) + 0.5 };
  }

  function latentAt(a, b) {
    const { center, directions, span } = state.manifold;
    return center.map((c, i) => c + a * span[0] * directions[0][i] + b * span[1] * directions[1][i]);
  }

  // Projection of a code onto the map's plane (the directions are orthonormal), as plane coordinates.
  function projectOnPlane(z) {
    const { center, directions, span } = state.manifold;
    const dot = (d) => d.reduce((s, di, i) => s + di * (z[i] - center[i]), 0);
    return { a: dot(directions[0]) / span[0], b: dot(directions[1]) / span[1] };
  }

  function drawMapOverlay(point) {
    const overlay = $("#map-overlay");
    const m = state.manifold;
    if (!m) return;
    if (point !== undefined) overlay.dataset.point = JSON.stringify(point);
    const chosen = point !== undefined ? point : overlay.dataset.point ? JSON.parse(overlay.dataset.point) : null;
    overlay.replaceChildren();
    const r = Math.max(m.tileW, m.tileH) * 0.45;
    if (state.posterior) {
      const { a, b } = projectOnPlane(state.posterior.mu);
      if (Math.abs(a) <= 1.2 && Math.abs(b) <= 1.2) {
        const { u, v } = tileCoords(a, b);
        svg("circle", { cx: u * m.tileW, cy: v * m.tileH, r, class: "marker-code" }, overlay);
      }
    }
    if (chosen) {
      const { u, v } = tileCoords(chosen.a, chosen.b);
      const x = u * m.tileW;
      const y = v * m.tileH;
      svg("line", { x1: x - r, x2: x + r, y1: y, y2: y, class: "marker-pick" }, overlay);
      svg("line", { x1: x, x2: x, y1: y - r, y2: y + r, class: "marker-pick" }, overlay);
    }
  }

  async function decodeAt(a, b) {
    if (!state.manifold || !state.model) return;
    const check = ticket("map-decode");
    const z = latentAt(a, b);
    drawMapOverlay({ a, b });
    const span = state.manifold.span;
    const where =
      state.manifold.basis === "prior"
        ? `z = (${fmt(z[0])}, ${fmt(z[1])})`
        : `PC1 ${fmt(a * span[0])}, PC2 ${fmt(b * span[1])}`;
    showError("map", null);
    try {
      const r = await api("POST", "v1/decode", { json: { model: state.model.name, latents: [z] } });
      const data = await r.json();
      if (!check()) return;
      const img = $("#map-decoded");
      img.dataset.latent = JSON.stringify(z);
      img.src = `data:image/png;base64,${data.images[0]}`;
      img.alt = `Decoded point ${where}`;
      $("#map-point").textContent = where;
      $("#map").dataset.decoded = "true";
    } catch (err) {
      if (check()) failed("map", err);
    }
  }

  function onMapClick(e) {
    if (!state.manifold) return;
    const canvas = $("#map-canvas");
    const rect = canvas.getBoundingClientRect();
    const steps = state.manifold.steps;
    const u = ((e.clientX - rect.left) / rect.width) * steps;
    const v = ((e.clientY - rect.top) / rect.height) * steps;
    state.cursor = { col: Math.min(steps - 1, Math.floor(u)), row: Math.min(steps - 1, Math.floor(v)) };
    const { a, b } = planeCoords(u, v);
    decodeAt(a, b);
  }

  function onMapKey(e) {
    if (!state.manifold) return;
    const steps = state.manifold.steps;
    const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    const centre = Math.floor(steps / 2);
    let cursor = state.cursor || { row: centre, col: centre };
    if (e.key in moves) {
      const [dr, dc] = moves[e.key];
      cursor = state.cursor
        ? { row: Math.min(steps - 1, Math.max(0, cursor.row + dr)), col: Math.min(steps - 1, Math.max(0, cursor.col + dc)) }
        : cursor;
    } else if (e.key !== "Enter" && e.key !== " ") {
      return;
    }
    e.preventDefault();
    state.cursor = cursor;
    const { a, b } = planeCoords(cursor.col + 0.5, cursor.row + 0.5);
    decodeAt(a, b);
  }

  // -- interpolation ------------------------------------------------------------------------------------------------
  async function interpolate() {
    if (!connected("interp")) return;
    const check = ticket("interp");
    showError("interp", null);
    if (!pads.a.inked || !pads.b.inked) {
      const missing = [!pads.a.inked && "A", !pads.b.inked && "B"].filter(Boolean).join(" and ");
      setStatus("interp", `Draw or upload image ${missing} first.`);
      return;
    }
    const steps = Math.min(32, Math.max(2, Math.round(Number($("#interp-steps").value) || 10)));
    $("#interp-steps").value = String(steps);
    const path = $("#interp-path").value;
    const started = performance.now();
    setBusy("interp", true);
    try {
      const images = [await pads.a.blob(), await pads.b.blob()];
      const form = formWith({ model: state.model.name, steps, path }, images);
      const data = await (await api("POST", "v1/interpolate", { form })).json();
      if (!check()) return;
      const strip = $("#interp-strip");
      strip.setAttribute("aria-label", `${steps} frames from A to B along a ${path === "spherical" ? "great circle" : "straight line"}`);
      strip.style.setProperty("--frames", String(data.images.length));
      renderTiles(strip, data.images, (i) => `frame ${i + 1} of ${data.images.length}`);
      done("interp", started, `${steps} frames`);
    } catch (err) {
      if (check()) failed("interp", err);
    }
  }

  function wirePad(container, pad) {
    const input = $("input[type=file]", container);
    const local = container.closest("section").id;
    $("[data-action=clear]", container).addEventListener("click", () => pad.clear());
    $("[data-action=upload]", container).addEventListener("click", () => input.click());
    $("[data-action=copy]", container)?.addEventListener("click", () => pad.copyFrom(pads.main));
    input.addEventListener("change", async () => {
      const file = input.files[0];
      input.value = "";
      if (!file) return;
      try {
        await pad.loadFile(file);
        showError(local, null);
        if (pad === pads.main) analyze();
      } catch (err) {
        showError(local, err);
      }
    });
  }

  // -- wiring -----------------------------------------------------------------------------------------------------
  const pads = {};

  // -- AE vs VAE: the same N(0, I) codes through a plain autoencoder and a VAE of the same data -------------------
  // The service draws z from a generator seeded by the request's seed, so one seed gives both models the same codes
  // when their latent sizes match (the pairs below require it).
  const COMPARE_N = 16;
  const COMPARE_MAP_STEPS = 12;

  function comparePairs() {
    const pairs = [];
    for (const ae of state.models.filter((m) => m.kind === "ae")) {
      const same = (m) => m.kind === "vae" && m.latent_dim === ae.latent_dim &&
        (m.dataset || {}).name === (ae.dataset || {}).name;
      const vae = state.models.find(same);
      if (vae) pairs.push([ae.name, vae.name]);
    }
    return pairs;
  }

  function renderComparePairs() {
    const select = $("#compare-pair");
    const previous = select.value;
    const pairs = comparePairs();
    select.innerHTML = "";
    for (const [ae, vae] of pairs) {
      const option = document.createElement("option");
      option.value = `${ae}|${vae}`;
      option.textContent = `${ae} vs ${vae}`;
      select.append(option);
    }
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
    const none = pairs.length === 0;
    select.disabled = none;
    $("#compare-run").disabled = none;
    setStatus("compare", none ? "No plain autoencoder is served beside a VAE of the same data and latent size." : "");
  }

  async function imageURL(path, query) {
    return URL.createObjectURL(await (await api("GET", path, { query })).blob());
  }

  async function compare() {
    const value = $("#compare-pair").value;
    if (!value) return;
    const [ae, vae] = value.split("|");
    const seed = Math.max(0, Math.floor(Number($("#compare-seed").value) || 0));
    const check = ticket("compare");
    const started = performance.now();
    showError("compare", null);
    setBusy("compare", true);
    try {
      const urls = await Promise.all([
        imageURL("v1/sample", { model: ae, n: COMPARE_N, seed, format: "png" }),
        imageURL("v1/sample", { model: vae, n: COMPARE_N, seed, format: "png" }),
        imageURL("v1/manifold", { model: ae, steps: COMPARE_MAP_STEPS, format: "png" }),
        imageURL("v1/manifold", { model: vae, steps: COMPARE_MAP_STEPS, format: "png" }),
      ]);
      if (!check()) {
        urls.forEach((url) => URL.revokeObjectURL(url));
        return;
      }
      ["#compare-ae-samples", "#compare-vae-samples", "#compare-ae-map", "#compare-vae-map"].forEach((id, i) => {
        const img = $(id);
        if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
        img.src = urls[i];
      });
      $("#compare-ae-caption").textContent = `${ae}: ${COMPARE_N} codes z ~ N(0, I), seed ${seed}`;
      $("#compare-vae-caption").textContent = `${vae}: the same ${COMPARE_N} codes`;
      done("compare", started, `${ae} and ${vae} compared`);
    } catch (err) {
      if (check()) failed("compare", err);
    }
  }

  function init() {
    pads.main = new Pad($("#draw"), { onStroke: updateSmallInput, onDrop: analyze });
    pads.a = new Pad($("#pad-a"));
    pads.b = new Pad($("#pad-b"));

    $("#brush").addEventListener("input", () => {
      $("#brush-out").textContent = $("#brush").value;
    });
    $("#clear").addEventListener("click", () => {
      pads.main.clear();
      updateSmallInput();
    });
    const upload = $("#upload");
    $("#upload-btn").addEventListener("click", () => upload.click());
    upload.addEventListener("change", async () => {
      const file = upload.files[0];
      upload.value = "";
      if (!file) return;
      try {
        await pads.main.loadFile(file);
        analyze();
      } catch (err) {
        failed("analyze", err);
      }
    });
    $("#reconstruct").addEventListener("click", analyze);
    $("#use-sample").addEventListener("click", useSample);
    for (const container of document.querySelectorAll(".mini-pad")) wirePad(container, pads[container.dataset.pad]);

    $("#model-select").addEventListener("change", (e) => selectModel(e.target.value));
    $("#model-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = apiKey();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      else sessionStorage.removeItem(KEY_STORAGE);
      loadModels();
    });

    $("#temperature").addEventListener("input", () => {
      $("#temperature-out").textContent = Number($("#temperature").value).toFixed(2);
    });
    $("#temperature").addEventListener("change", loadSamples);
    $("#seed").addEventListener("change", loadSamples);
    $("#sample-form").addEventListener("submit", (e) => {
      e.preventDefault(); // Enter in the seed field: these settings
      loadSamples();
    });
    $("#new-samples").addEventListener("click", () => {
      $("#seed").value = String(randomSeed());
      loadSamples();
    });

    tileKeys($("#sample-grid"), Math.round(Math.sqrt(SAMPLE_N)));
    $("#map-canvas").addEventListener("click", onMapClick);
    $("#map-canvas").addEventListener("keydown", onMapKey);
    $("#map-steps").addEventListener("change", loadManifold);

    $("#interp-form").addEventListener("submit", (e) => {
      e.preventDefault();
      interpolate();
    });

    $("#compare-form").addEventListener("submit", (e) => {
      e.preventDefault();
      compare();
    });

    $("#api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
    updateSmallInput();
    loadModels();
  }

  init();
})();
