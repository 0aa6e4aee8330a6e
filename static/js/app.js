/* VALD-MD review page behaviour. No inline scripts or handlers anywhere (CSP script-src 'self'); everything
   is wired here by delegation or in htmx.onLoad, so content swapped in by htmx works the same as the page.

   - upload: drag-and-drop onto the drop zone feeds the file input (htmx then posts it to /inspect)
   - form: model presets (prompt + strength/guidance/steps/scheduler), prompt chips, slider read-outs,
     effective steps = int(steps * strength), "reuse seed"
   - viewer: synchronised zoom/pan/flip/rotation across panels, fit and 1:1, window/level on the run's own
     16-bit values (canvas + lookup table; mouse drag in the PACS direction, presets, invert, reset), pixel
     probe, length measurement (mm with the file's pixel spacing), one panel maximised, full screen, the form
     hidden, overlay toggle, lung outline layer on/off (the overlay form's checkbox; htmx sends it too, for the
     export links), before/after swipe compare
   - keyboard: o overlay, l lung outline, c compare, f fit, a one-to-one, + / - zoom, arrows move the swipe,
     1-4 window presets, i invert, r reset, w / p / d mouse tool (window, pan, measure), h / v flip, [ ] rotate,
     m maximise, Shift+F full screen, s form hidden, Esc clears the measurement or leaves the maximised panel
   - stale results: choosing a new file greys out the result on screen at once and marks it "stale" (a result of
     the previous image that arrives later is marked too), clears old error banners and a case label that
     belonged to the previous run
   - progress: falls back from server-sent events to polling when the stream keeps failing */
(function () {
  "use strict";

  // ---- form ------------------------------------------------------------------------------------------------
  function effectiveSteps(steps, strength) {
    // diffusers' quantisation, as engine.effective_steps: min(int(steps * strength), steps)
    return Math.min(Math.floor(steps * strength + 1e-9), steps);
  }

  function updateOutputs(root) {
    root.querySelectorAll("[data-output-for]").forEach(function (out) {
      var input = document.getElementById(out.getAttribute("data-output-for"));
      if (!input) return;
      var step = input.getAttribute("step") || "1";
      var decimals = step.indexOf(".") >= 0 ? step.split(".")[1].length : 0;
      out.textContent = Number(input.value).toFixed(decimals);
    });
    var steps = document.getElementById("steps");
    var strength = document.getElementById("strength");
    var eff = document.querySelector("[data-effective-steps]");
    if (steps && strength && eff) {
      var n = effectiveSteps(Number(steps.value), Number(strength.value));
      eff.textContent = String(n);
      eff.classList.toggle("is-invalid", n < 1);
    }
  }

  document.addEventListener("input", function (e) {
    var t = e.target;
    if (t.matches && t.matches("input[type=range]")) updateOutputs(document);
    if (t.id === "seed" && t.value !== "") {
      var fixed = document.querySelector("input[name=seed_mode][value=fixed]");
      if (fixed) fixed.checked = true;
    }
    if (t.id === "prompt") markChip(t.value);
  });

  function markChip(text) {
    document.querySelectorAll("[data-prompt]").forEach(function (chip) {
      chip.classList.toggle("is-active", chip.getAttribute("data-prompt") === text);
    });
  }

  function applyPreset(button) {
    // a model preset sets the prompt, strength, guidance, steps, scheduler, samples and (when it names them) the
    // map polarity, map smoothing and counterfactual shown at once (its title says which)
    // (or, from an annotated PNG export, the run's parameters including its negative prompt, samples, seed, map
    // method, classifier scale and whether the map is restricted to the lungs)
    ["prompt", "negative_prompt", "strength", "guidance_scale", "steps", "scheduler", "samples", "map_method",
     "map_polarity", "map_smoothing", "counterfactual_edit", "classifier_scale", "seed", "lung_mask"]
      .forEach(function (name) {
        var field = document.getElementById(name);
        var value = button.getAttribute("data-model-preset-" + name);
        if (!field || value === null) return;
        if (field.type === "checkbox") field.checked = value === "true";
        else field.value = value;
      });
    if (button.hasAttribute("data-model-preset-seed")) {
      var fixed = document.querySelector("input[name=seed_mode][value=fixed]");
      if (fixed) fixed.checked = true;
    }
    document.querySelectorAll("[data-model-preset]").forEach(function (b) {
      b.classList.toggle("is-active", b === button);
    });
    var prompt = document.getElementById("prompt");
    if (prompt) markChip(prompt.value);
    updateOutputs(document);
  }

  document.addEventListener("click", function (e) {
    var preset = e.target.closest("[data-model-preset]");
    if (preset) { applyPreset(preset); return; }
    var chip = e.target.closest("[data-prompt]");
    if (chip) {
      var prompt = document.getElementById("prompt");
      if (prompt) { prompt.value = chip.getAttribute("data-prompt"); markChip(prompt.value); prompt.focus(); }
      return;
    }
    var reuse = e.target.closest("[data-reuse-seed]");
    if (reuse) {
      var seed = document.getElementById("seed");
      var fixed = document.querySelector("input[name=seed_mode][value=fixed]");
      if (seed) seed.value = reuse.getAttribute("data-reuse-seed");
      if (fixed) fixed.checked = true;
      return;
    }
    var action = e.target.closest("[data-action]");
    if (action) viewerAction(action.getAttribute("data-action"), action);
  });

  // ---- drag and drop -----------------------------------------------------------------------------------------
  function showFileName(input) {
    var zone = input.closest("[data-dropzone]");
    var label = zone && zone.querySelector("[data-file-name]");
    if (label) label.textContent = input.files && input.files.length ? input.files[0].name : "";
  }

  document.addEventListener("change", function (e) {
    if (e.target.id === "file") { showFileName(e.target); newFileChosen(e.target); }
  });

  // ---- stale results ----------------------------------------------------------------------------------------
  // A result on screen belongs to the image it was made from. Once another file is chosen, nothing of the old
  // result may pass for the new image: it is greyed out and labelled until Generate runs on the new file.
  var fileChangedSinceSubmit = false;

  function markStale(run) {
    if (!run || !run.hasAttribute("data-job") || run.classList.contains("is-stale")) return;
    run.classList.add("is-stale");
    run.setAttribute("data-stale", "true");
    var input = document.getElementById("file");
    var name = input && input.files && input.files.length ? input.files[0].name : "the new file";
    var note = document.createElement("p");
    note.className = "stale-banner";
    note.setAttribute("role", "status");
    note.setAttribute("data-stale-banner", "");
    note.textContent = "Stale: this result belongs to the previous image, not to " + name +
      ". Press Generate to review the new file.";
    run.insertBefore(note, run.firstChild);
  }

  function newFileChosen(input) {
    if (!input.files || !input.files.length) return;
    fileChangedSinceSubmit = true;
    markStale(document.getElementById("run"));
    var msgs = document.getElementById("messages");
    if (msgs) msgs.innerHTML = "";
    document.querySelectorAll("#file-facts .alert").forEach(function (a) { a.remove(); });
    var label = document.querySelector("#case_label[data-label-of-run]");
    if (label) { label.value = ""; label.removeAttribute("data-label-of-run"); }
  }

  document.addEventListener("htmx:beforeRequest", function (e) {
    var t = e.target;
    // a new run for the chosen file, or the user opening a run of their history: what comes next is current
    // (only the run's link: Delete, also inside the item, opens nothing)
    if (t && (t.id === "review-form" || (t.closest && t.closest(".history-item > a")))) fileChangedSinceSubmit = false;
  });

  ["dragenter", "dragover"].forEach(function (type) {
    document.addEventListener(type, function (e) {
      var zone = e.target.closest && e.target.closest("[data-dropzone]");
      if (!zone) return;
      e.preventDefault();
      zone.classList.add("is-dragover");
    });
  });
  document.addEventListener("dragleave", function (e) {
    var zone = e.target.closest && e.target.closest("[data-dropzone]");
    if (zone && !zone.contains(e.relatedTarget)) zone.classList.remove("is-dragover");
  });
  document.addEventListener("drop", function (e) {
    var zone = e.target.closest && e.target.closest("[data-dropzone]");
    if (!zone) return;
    e.preventDefault();
    zone.classList.remove("is-dragover");
    var input = zone.querySelector("input[type=file]");
    if (!input || !e.dataTransfer || !e.dataTransfer.files.length) return;
    var dt = new DataTransfer();
    dt.items.add(e.dataTransfer.files[0]);
    input.files = dt.files;
    input.dispatchEvent(new Event("change", { bubbles: true }));
  });

  // ---- viewer: shared view state -----------------------------------------------------------------------------
  // One view for every panel: zoom and pan (translation as a fraction of the viewport, so panels of different
  // sizes show the same region), flips and rotation of the image inside the panel (the data is unchanged).
  var view = { scale: 1, tx: 0, ty: 0, rot: 0, flipH: false, flipV: false };
  var MIN_SCALE = 1, MAX_SCALE = 32;
  var tool = "wl";                 // what the left button does: wl | pan | measure
  var hoverPanel = null;           // the panel last under the mouse (maximise, probe)

  function viewer() { return document.querySelector("[data-viewer]"); }

  function visibleViewports() {
    var v = viewer();
    if (!v) return [];
    return Array.prototype.filter.call(v.querySelectorAll("[data-viewport]"), function (vp) {
      return vp.offsetParent !== null;
    });
  }

  function clampView() {
    view.scale = Math.min(MAX_SCALE, Math.max(MIN_SCALE, view.scale));
    // keep some of the image in view: translation within [-(scale-1), 0] of the viewport
    var lo = -(view.scale - 1);
    view.tx = Math.min(0, Math.max(lo, view.tx));
    view.ty = Math.min(0, Math.max(lo, view.ty));
  }

  function imageSize() {
    // native size: from the pixel data once loaded, else the first image, else the template's numbers
    if (pix.facts) return { cols: pix.facts.columns, rows: pix.facts.rows };
    var v = viewer();
    var img = v && v.querySelector("img.wl");
    if (img && img.naturalWidth) return { cols: img.naturalWidth, rows: img.naturalHeight };
    var w = v && Number(v.getAttribute("data-width")), h = v && Number(v.getAttribute("data-height"));
    return w && h ? { cols: w, rows: h } : null;
  }

  function orientBox(w, h) {
    // the box the image is fitted into: the viewport, turned by a quarter when rotated by 90 or 270 degrees
    var quarter = view.rot % 180 !== 0;
    var bw = quarter ? h : w, bh = quarter ? w : h;
    return { w: bw, h: bh, left: (w - bw) / 2, top: (h - bh) / 2 };
  }

  function imageMatrix(vp) {
    // image pixel (x, y) -> viewport pixel: pan/zoom, then the orientation about the box centre, then the
    // object-fit: contain placement of the image in its box
    var size = imageSize();
    if (!size) return null;
    var w = vp.clientWidth, h = vp.clientHeight, box = orientBox(w, h);
    var fit = Math.min(box.w / size.cols, box.h / size.rows);
    return new DOMMatrix()
      .translateSelf(view.tx * w, view.ty * h).scaleSelf(view.scale, view.scale)
      .translateSelf(box.left + box.w / 2, box.top + box.h / 2).rotateSelf(view.rot)
      .scaleSelf(view.flipH ? -1 : 1, view.flipV ? -1 : 1)
      .translateSelf(-box.w / 2, -box.h / 2)
      .translateSelf((box.w - size.cols * fit) / 2, (box.h - size.rows * fit) / 2).scaleSelf(fit, fit);
  }

  function imagePoint(vp, clientX, clientY) {
    var m = imageMatrix(vp);
    if (!m) return null;
    var r = vp.getBoundingClientRect();
    var p = m.inverse().transformPoint(new DOMPoint(clientX - r.left, clientY - r.top));
    return { x: p.x, y: p.y };
  }

  function applyView() {
    clampView();
    var v = viewer();
    if (!v) return;
    v.querySelectorAll("[data-viewport]").forEach(function (vp) {
      var stage = vp.querySelector("[data-stage]");
      var w = vp.clientWidth, h = vp.clientHeight, box = orientBox(w, h);
      stage.style.transform = "translate(" + (view.tx * w) + "px," + (view.ty * h) + "px) scale(" + view.scale + ")";
      vp.querySelectorAll("[data-orient]").forEach(function (o) {
        o.style.left = box.left + "px"; o.style.top = box.top + "px";
        o.style.width = box.w + "px"; o.style.height = box.h + "px";
        o.style.transform = "rotate(" + view.rot + "deg) scale(" + (view.flipH ? -1 : 1) + "," + (view.flipV ? -1 : 1) + ")";
      });
    });
    v.classList.toggle("is-zoomed", view.scale > 1.001);
    pressed("[data-action=flip-h]", view.flipH);
    pressed("[data-action=flip-v]", view.flipV);
    updateSwipe();
    drawMeasure();
    var label = document.querySelector("[data-zoom-level]");
    if (label) {
      var m = magnification();
      label.textContent = view.scale <= 1.001 ? "fit" + (m ? " (" + Math.round(m * 100) + " %)" : "") : Math.round(m * 100) + " %";
    }
  }

  function pressed(selector, on) {
    document.querySelectorAll(selector).forEach(function (b) { b.setAttribute("aria-pressed", String(Boolean(on))); });
  }

  function magnification() {
    // screen pixels per image pixel in the first visible panel
    var vp = visibleViewports()[0], size = imageSize();
    if (!vp || !size) return null;
    var box = orientBox(vp.clientWidth, vp.clientHeight);
    var fit = Math.min(box.w / size.cols, box.h / size.rows);
    return view.scale * fit * (window.devicePixelRatio || 1);
  }

  function zoomAt(factor, fx, fy) {
    // fx, fy: focus point as a fraction of the viewport (0..1); the image point under it stays put
    var s0 = view.scale;
    var s1 = Math.min(MAX_SCALE, Math.max(MIN_SCALE, s0 * factor));
    view.tx = fx - (fx - view.tx) * (s1 / s0);
    view.ty = fy - (fy - view.ty) * (s1 / s0);
    view.scale = s1;
    applyView();
  }

  function oneToOne() {
    var m = magnification();
    if (!m) return;
    var target = view.scale / m;
    if (target <= 1) { view.scale = 1; view.tx = 0; view.ty = 0; applyView(); return; }
    zoomAt(target / view.scale, 0.5, 0.5);
  }

  function resetDisplay() {
    view = { scale: 1, tx: 0, ty: 0, rot: 0, flipH: false, flipV: false };
    measure = null;
    resetWindow();
    applyView();
  }

  function viewerAction(action, button) {
    if (action === "fit") { view.scale = 1; view.tx = 0; view.ty = 0; applyView(); }
    else if (action === "one-to-one") oneToOne();
    else if (action === "zoom-in") zoomAt(1.25, 0.5, 0.5);
    else if (action === "zoom-out") zoomAt(0.8, 0.5, 0.5);
    else if (action === "compare") toggleCompare();
    else if (action === "overlay") toggleOverlay();
    else if (action === "invert") { wl.invert = !wl.invert; renderSoon(); }
    else if (action === "reset") resetDisplay();
    else if (action === "flip-h") { view.flipH = !view.flipH; applyView(); }
    else if (action === "flip-v") { view.flipV = !view.flipV; applyView(); }
    else if (action === "rotate-right") { view.rot = (view.rot + 90) % 360; applyView(); }
    else if (action === "rotate-left") { view.rot = (view.rot + 270) % 360; applyView(); }
    else if (action === "maximise") toggleMaximise(null);
    else if (action === "fullscreen") toggleFullscreen();
    else if (action === "sidebar") toggleSidebar();
    else if (action === "preset") applyWindowPreset(Number(button.getAttribute("data-preset-index")));
  }

  // ---- mouse: the active tool on the left button, W/L on the right, pan on the middle or with Shift ----------
  document.addEventListener("wheel", function (e) {
    var vp = e.target.closest && e.target.closest("[data-viewport]");
    if (!vp) return;
    e.preventDefault();
    var r = vp.getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? 1.15 : 1 / 1.15, (e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height);
  }, { passive: false });

  document.addEventListener("contextmenu", function (e) {
    if (e.target.closest && e.target.closest("[data-viewport]")) e.preventDefault();   // the right button windows
  });

  var drag = null;
  document.addEventListener("pointerdown", function (e) {
    var vp = e.target.closest && e.target.closest("[data-viewport]");
    if (!vp || e.button > 2) return;
    var mode = e.button === 1 || (e.button === 0 && e.shiftKey) ? "pan" : e.button === 2 ? "wl" : tool;
    if (mode === "wl" && !pix.facts) mode = "pan";
    e.preventDefault();
    drag = { mode: mode, vp: vp, x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty, w: vp.clientWidth,
             h: vp.clientHeight, center: wl.center, width: wl.width };
    if (mode === "measure") {
      var p = clampToImage(imagePoint(vp, e.clientX, e.clientY));
      measure = p ? { a: p, b: p } : null;
      drawMeasure();
    }
    vp.setPointerCapture(e.pointerId);
    vp.classList.add(mode === "pan" ? "is-panning" : "is-windowing");
  });
  document.addEventListener("pointermove", function (e) {
    if (!drag) { probe(e); return; }
    var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (drag.mode === "pan") {
      view.tx = drag.tx + dx / drag.w;
      view.ty = drag.ty + dy / drag.h;
      applyView();
    } else if (drag.mode === "wl") {
      // PACS direction: right widens the window (less contrast), down raises the centre, which darkens what is
      // shown; on an inverted display (MONOCHROME1, or Invert) "darker" is a lower centre in the data's units
      var step = pix.sensitivity;
      var darker = pix.facts.inverted !== wl.invert ? -1 : 1;
      wl.width = Math.max(1, drag.width + dx * step);
      wl.center = drag.center + darker * dy * step;
      wl.preset = null;
      renderSoon();
    } else if (drag.mode === "measure" && measure) {
      measure.b = clampToImage(imagePoint(drag.vp, e.clientX, e.clientY)) || measure.b;
      drawMeasure();
    }
  });
  function endDrag() {
    if (!drag) return;
    drag = null;
    document.querySelectorAll(".is-panning, .is-windowing").forEach(function (el) {
      el.classList.remove("is-panning", "is-windowing");
    });
  }
  document.addEventListener("pointerup", endDrag);
  document.addEventListener("pointercancel", endDrag);
  document.addEventListener("dblclick", function (e) {
    var panel = e.target.closest && e.target.closest("[data-viewer] .panel");
    if (panel && e.target.closest("[data-viewport]")) toggleMaximise(panel);
  });
  document.addEventListener("pointerover", function (e) {
    var panel = e.target.closest && e.target.closest("[data-viewer] .panel");
    if (panel) hoverPanel = panel;
  });
  window.addEventListener("resize", function () { applyView(); });

  function setTool(name) {
    tool = name;
    document.querySelectorAll("[data-tool]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-tool") === name));
    });
    var v = viewer();
    if (v) v.setAttribute("data-active-tool", name);
  }
  document.addEventListener("click", function (e) {
    var b = e.target.closest && e.target.closest("[data-tool]");
    if (b) setTool(b.getAttribute("data-tool"));
  });

  // ---- window / level on the data's own values ------------------------------------------------------------
  // The server sends the run's pixels as uint16 .npy (value = pixel * slope + intercept, in the data's units:
  // modality values of a DICOM, stored values of a PNG) and the facts to window them (GET .../viewing). Each
  // image is windowed through a 65536-entry lookup table into its <canvas>; the <img> beneath stays as the
  // fallback until the data has arrived.
  var pix = { facts: null, sources: {}, url: null, sensitivity: 1, frame: 0, other: null };
  var wl = { center: 0, width: 1, fn: "LINEAR_EXACT", invert: false, preset: null };
  var lut = new Uint32Array(65536);

  function parseNpy(buffer) {
    // NumPy .npy, versions 1-3: magic, version, header length, a Python dict literal, then the C-order data
    var bytes = new Uint8Array(buffer);
    if (bytes[0] !== 0x93 || String.fromCharCode.apply(null, bytes.subarray(1, 6)) !== "NUMPY") throw new Error("not .npy");
    var dv = new DataView(buffer);
    var major = bytes[6];
    var hlen = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true);
    var start = major === 1 ? 10 : 12;
    var header = new TextDecoder("latin1").decode(bytes.subarray(start, start + hlen));
    if (header.indexOf("'<u2'") < 0 || header.indexOf("'fortran_order': False") < 0) throw new Error("not C-order uint16");
    var shape = /'shape': \((\d+), (\d+)\)/.exec(header);
    var rows = Number(shape[1]), cols = Number(shape[2]);
    return { rows: rows, cols: cols, data: new Uint16Array(buffer, start + hlen, rows * cols) };
  }

  function loadPixels(v) {
    var url = v.getAttribute("data-viewing-url");
    if (!url) return;
    if (pix.url === url) {                       // the same run drawn again: keep its window
      delete pix.sources.other;
      pix.other = null;
      if (pix.facts) showPixels();
      return;
    }
    pix = { facts: null, sources: {}, url: url, sensitivity: 1, frame: 0, other: null };
    var mine = pix;
    fetch(url, { credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error("viewing " + r.status);
      return r.json();
    }).then(function (facts) {
      var names = Object.keys(facts.pixels);
      return Promise.all(names.map(function (name) {
        return fetch(facts.pixels[name], { credentials: "same-origin" }).then(function (r) {
          if (!r.ok) throw new Error("pixels " + r.status);
          return r.arrayBuffer();
        }).then(function (buf) { return [name, parseNpy(buf)]; });
      })).then(function (pairs) {
        if (pix !== mine) return;                       // another run came in meanwhile
        var hi = 0;
        pairs.forEach(function (p) {
          mine.sources[p[0]] = p[1];
          if (p[0] === "input") { var d = p[1].data; for (var i = 0; i < d.length; i++) if (d[i] > hi) hi = d[i]; }
        });
        mine.facts = facts;
        // one screen pixel of drag moves the window by 1/600 of the data's range (at least one unit)
        mine.sensitivity = Math.max(hi * facts.rescale.slope / 600, facts.rescale.slope);
        resetWindow();
        showPixels();
      });
    }).catch(function () {
      var out = document.querySelector("[data-wl-readout]");
      if (out) out.textContent = "W/L unavailable (showing the run's window)";
    });
  }

  function showPixels() {
    var live = viewer();
    if (!live) return;
    buildPresetButtons(pix.facts);
    live.classList.add("has-pixels");
    listOtherRuns();
    renderSoon();
    applyView();
  }

  function buildPresetButtons(facts) {
    var holder = document.querySelector("[data-wl-presets]");
    if (!holder) return;
    holder.textContent = "";
    facts.presets.forEach(function (p, i) {
      var b = document.createElement("button");
      b.type = "button";
      b.className = "btn btn-small";
      b.setAttribute("data-action", "preset");
      b.setAttribute("data-preset-index", String(i));
      b.setAttribute("aria-pressed", "false");
      var key = i < facts.preset_keys ? String(i + 1) : "";
      b.title = p.label + ": centre " + fmt(p.center) + ", width " + fmt(p.width) +
        (p.kind === "relative" ? " (from this image's histogram)" : " (stored in the file)") + (key ? " (" + key + ")" : "");
      b.textContent = p.label + " ";
      if (key) { var k = document.createElement("kbd"); k.textContent = key; b.appendChild(k); }
      holder.appendChild(b);
    });
  }

  function fmt(x) { return Math.abs(x) >= 100 ? String(Math.round(x)) : String(Math.round(x * 100) / 100); }

  function resetWindow() {
    if (!pix.facts) return;
    var w = pix.facts.window || pix.facts.presets[pix.facts.presets.length - 1];
    wl = { center: w.center, width: w.width, fn: w.function || "LINEAR_EXACT", invert: false, preset: null };
    renderSoon();
  }

  function applyWindowPreset(i) {
    if (!pix.facts || !pix.facts.presets[i]) return;
    var p = pix.facts.presets[i];
    wl.center = p.center; wl.width = p.width; wl.fn = p.function; wl.preset = i;
    renderSoon();
  }

  function buildLut() {
    // the VOI of PS3.3 C.11.2.1 on value = i * slope + intercept, then the display polarity, to 8-bit gray
    var f = pix.facts, slope = f.rescale.slope, icpt = f.rescale.intercept;
    var c = wl.center, w = wl.width, fn = wl.fn, inv = f.inverted !== wl.invert;
    for (var i = 0; i < 65536; i++) {
      var x = i * slope + icpt, y;
      if (fn === "LINEAR") y = w <= 1 ? (x > c - 0.5 ? 1 : 0) : (x - (c - 0.5)) / (w - 1) + 0.5;
      else if (fn === "SIGMOID") y = 1 / (1 + Math.exp(-4 * (x - c) / w));
      else y = (x - c) / w + 0.5;
      y = y < 0 ? 0 : y > 1 ? 1 : y;
      if (inv) y = 1 - y;
      var g = Math.round(y * 255);
      lut[i] = 0xff000000 | (g << 16) | (g << 8) | g;     // RGBA bytes on a little-endian machine
    }
  }

  function renderSoon() {
    if (pix.frame) return;
    pix.frame = requestAnimationFrame(function () { pix.frame = 0; renderWindow(); });
  }

  function renderWindow() {
    var v = viewer();
    if (!v || !pix.facts) return;
    buildLut();
    Object.keys(pix.sources).forEach(function (name) {
      var src = pix.sources[name];
      var canvases = v.querySelectorAll("canvas[data-wl-source=" + name + "]");
      if (!canvases.length) return;
      if (!src.image) {
        src.image = new ImageData(src.cols, src.rows);
        src.rgba = new Uint32Array(src.image.data.buffer);
      }
      var d = src.data, out = src.rgba;
      for (var i = 0; i < d.length; i++) out[i] = lut[d[i]];
      canvases.forEach(function (cv) {
        if (cv.width !== src.cols || cv.height !== src.rows) { cv.width = src.cols; cv.height = src.rows; }
        cv.getContext("2d").putImageData(src.image, 0, 0);
        cv.setAttribute("data-rendered", "true");
      });
    });
    v.setAttribute("data-wl", fmt(wl.center) + "/" + fmt(wl.width) + (wl.invert ? "/inverted" : ""));
    var out = document.querySelector("[data-wl-readout]");
    if (out) {
      var name = wl.preset !== null ? pix.facts.presets[wl.preset].label + " · " : "";
      out.textContent = name + "C " + fmt(wl.center) + " · W " + fmt(wl.width) + (wl.invert ? " · inverted" : "");
      out.setAttribute("data-center", String(wl.center));
      out.setAttribute("data-width", String(wl.width));
    }
    document.querySelectorAll("[data-action=preset]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(Number(b.getAttribute("data-preset-index")) === wl.preset));
    });
    pressed("[data-action=invert]", wl.invert);
  }

  // ---- pixel probe and length measurement ----------------------------------------------------------------
  function panelSource(panel, vp, clientX) {
    // which image is under the mouse: the panel's, or in compare mode the side of the swipe line
    var name = panel.getAttribute("data-source") || "input";
    if (panel.getAttribute("data-panel") === "compare") {
      var slider = panel.querySelector("[data-swipe]"), r = vp.getBoundingClientRect();
      if ((clientX - r.left) / r.width > Number(slider.value) / 100) name = "counterfactual";
    }
    return pix.sources[name] ? name : "input";
  }

  function probe(e) {
    var out = document.querySelector("[data-probe]");
    var vp = e.target.closest && e.target.closest("[data-viewport]");
    if (!out || !vp || !pix.facts) return;
    var p = imagePoint(vp, e.clientX, e.clientY);
    var x = p && Math.floor(p.x), y = p && Math.floor(p.y);
    if (!p || x < 0 || y < 0 || x >= pix.facts.columns || y >= pix.facts.rows) {
      out.textContent = "Pixel value: outside the image.";
      out.removeAttribute("data-value");
      return;
    }
    var name = panelSource(vp.closest(".panel"), vp, e.clientX);
    var raw = pix.sources[name].data[y * pix.facts.columns + x];
    var value = raw * pix.facts.rescale.slope + pix.facts.rescale.intercept;
    var label = name === "input" ? "Original" : name === "counterfactual" ? "Counterfactual" :
      "Run " + pix.other.id.slice(0, 8) + " counterfactual";
    out.textContent = label + " (x " + x + ", y " + y + "): " + fmt(value) + " " + pix.facts.units +
      (name === "input" ? "" : " (within its run's window)");
    out.setAttribute("data-value", String(value));
    out.setAttribute("data-x", String(x));
    out.setAttribute("data-y", String(y));
  }

  var measure = null;              // { a: {x, y}, b: {x, y} } in image pixels

  function clampToImage(p) {
    var size = imageSize();
    if (!p || !size) return null;
    return { x: Math.max(0, Math.min(size.cols, p.x)), y: Math.max(0, Math.min(size.rows, p.y)) };
  }

  function measureText() {
    if (!measure) return "";
    var f = pix.facts, dx = measure.b.x - measure.a.x, dy = measure.b.y - measure.a.y;
    var px = Math.hypot(dx, dy);
    if (f && f.pixel_spacing_mm) {
      // (0028,0030) is (row spacing, column spacing): rows are apart vertically, columns horizontally
      var mm = Math.hypot(dx * f.pixel_spacing_mm[1], dy * f.pixel_spacing_mm[0]);
      return mm.toFixed(1) + " mm" + (f.spacing_source === "ImagerPixelSpacing" ? " (at the detector)" : "");
    }
    return px.toFixed(1) + " px (no pixel spacing in the file)";
  }

  var SVG = "http://www.w3.org/2000/svg";
  function drawMeasure() {
    var v = viewer();
    if (!v) return;
    var text = measureText();
    var readout = document.querySelector("[data-measure-readout]");
    if (readout) {
      readout.textContent = text ? "Length: " + text : "";
      readout.setAttribute("data-length", text);
    }
    v.querySelectorAll("[data-viewport]").forEach(function (vp) {
      var layer = vp.querySelector("[data-measure-layer]");
      if (!layer) {
        layer = document.createElementNS(SVG, "svg");
        layer.setAttribute("class", "measure-layer");
        layer.setAttribute("data-measure-layer", "");
        layer.setAttribute("aria-hidden", "true");
        vp.appendChild(layer);
      }
      layer.textContent = "";
      var m = measure && imageMatrix(vp);
      if (!m || vp.offsetParent === null) return;
      var a = m.transformPoint(new DOMPoint(measure.a.x, measure.a.y));
      var b = m.transformPoint(new DOMPoint(measure.b.x, measure.b.y));
      var line = document.createElementNS(SVG, "line");
      [["x1", a.x], ["y1", a.y], ["x2", b.x], ["y2", b.y]].forEach(function (kv) { line.setAttribute(kv[0], kv[1]); });
      layer.appendChild(line);
      [a, b].forEach(function (p) {
        var dot = document.createElementNS(SVG, "circle");
        dot.setAttribute("cx", p.x); dot.setAttribute("cy", p.y); dot.setAttribute("r", 3);
        layer.appendChild(dot);
      });
      var label = document.createElementNS(SVG, "text");
      label.setAttribute("x", Math.max(40, Math.min(vp.clientWidth - 40, (a.x + b.x) / 2)));
      label.setAttribute("y", Math.max(16, Math.min(a.y, b.y) - 8));
      label.setAttribute("text-anchor", "middle");
      label.textContent = text.split(" (")[0];          // the readout under the panels says the rest
      layer.appendChild(label);
    });
  }

  // ---- another run beside this one ---------------------------------------------------------------------------
  // One of the user's other finished runs of an image of the same size: its counterfactual in this run's window
  // (its values brought into this run's rescale) under its own map, in a fourth panel with the same view.
  function listOtherRuns() {
    var sel = document.querySelector("[data-compare-run]");
    var run = document.getElementById("run");
    if (!sel || !run || !pix.facts) return;
    var current = run.getAttribute("data-job"), facts = pix.facts;
    fetch("/api/v1/jobs?limit=50", { credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error("jobs " + r.status);
      return r.json();
    }).then(function (data) {
      if (pix.facts !== facts) return;
      var runs = data.jobs.filter(function (j) {
        return j.state === "done" && j.job_id !== current && j.input && j.input.rows === facts.rows &&
          j.input.columns === facts.columns && j.input.source_format === facts.source_format;
      });
      while (sel.options.length > 1) sel.remove(1);
      runs.forEach(function (j) {
        var p = j.parameters || {};
        var o = document.createElement("option");
        o.value = j.job_id;
        o.textContent = j.job_id.slice(0, 8) + " · seed " + (j.seeds || []).join(",") + " · strength " + p.strength +
          " · " + String(p.prompt || "").slice(0, 40);
        sel.appendChild(o);
      });
      sel.hidden = runs.length === 0;
    }).catch(function () { sel.hidden = true; });
  }

  function showOtherRun(id) {
    var v = viewer();
    var panel = v && v.querySelector("[data-panel=other]");
    if (!panel) return;
    if (!id) {
      delete pix.sources.other;
      pix.other = null;
      panel.hidden = true;
      v.classList.remove("has-other");
      applyView();
      return;
    }
    var mine = pix;
    // ?beside=1: showing another run (maybe another patient) is a view of that run, audited by the server
    fetch("/api/v1/jobs/" + id + "/viewing?beside=1", { credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error("viewing " + r.status);
      return r.json();
    }).then(function (facts) {
      return fetch(facts.pixels.counterfactual, { credentials: "same-origin" }).then(function (r) {
        if (!r.ok) throw new Error("pixels " + r.status);
        return r.arrayBuffer();
      }).then(function (buf) {
        if (pix !== mine) return;
        var src = parseNpy(buf), a = facts.rescale, b = pix.facts.rescale;
        if (a.slope !== b.slope || a.intercept !== b.intercept) {
          var d = src.data, out = new Uint16Array(d.length);
          for (var i = 0; i < d.length; i++) {
            var u = Math.round((d[i] * a.slope + a.intercept - b.intercept) / b.slope);
            out[i] = u < 0 ? 0 : u > 65535 ? 65535 : u;
          }
          src.data = out;
        }
        pix.sources.other = src;
        pix.other = { id: id, facts: facts };
        panel.querySelector("[data-other-id]").textContent = id.slice(0, 8);
        var opt = document.querySelector("[data-compare-run] option[value='" + id + "']");
        var same = facts.input_sha256 && facts.input_sha256 === pix.facts.input_sha256;
        panel.querySelector("[data-other-caption]").textContent = (opt ? opt.textContent.split(" · ").slice(1, 3).join(" · ") : "") +
          (same ? " · same image" : " · another image of this size");
        var orient = panel.querySelector("[data-orient]");
        var old = orient.querySelector("img");
        if (old) old.remove();
        var img = document.createElement("img");
        img.className = "img overlay";
        img.setAttribute("data-overlay", "");
        img.setAttribute("draggable", "false");
        img.alt = "Attribution overlay of run " + id.slice(0, 8) + " (AI-generated)";
        img.src = "/api/v1/jobs/" + id + "/overlay.png";
        orient.appendChild(img);
        panel.hidden = false;
        v.classList.add("has-other");
        renderSoon();
        applyView();
      });
    }).catch(function () {
      panel.hidden = true;
      var out = document.querySelector("[data-probe]");
      if (out) out.textContent = "The other run could not be loaded.";
    });
  }
  document.addEventListener("change", function (e) {
    if (e.target.matches && e.target.matches("[data-compare-run]")) {
      showOtherRun(e.target.value);
      e.target.blur();                             // the viewer's keys work again at once
    }
  });

  // ---- overlay toggle and compare ---------------------------------------------------------------------------
  function toggleOverlay() {
    var v = viewer();
    if (!v) return;
    var hidden = v.classList.toggle("overlay-hidden");
    var b = document.querySelector("[data-action=overlay]");
    if (b) b.setAttribute("aria-pressed", String(!hidden));
  }

  function applyLungOutline() {
    var v = viewer();
    var box = document.querySelector("[data-lung-toggle]");
    if (v) v.classList.toggle("lungs-shown", Boolean(box && box.checked));
  }
  document.addEventListener("change", function (e) {
    if (e.target.matches && e.target.matches("[data-lung-toggle]")) applyLungOutline();
  });

  function toggleLungOutline() {
    var box = document.querySelector("[data-lung-toggle]");
    if (!box) return;
    box.checked = !box.checked;
    box.dispatchEvent(new Event("input", { bubbles: true }));   // htmx: the export links follow
    applyLungOutline();
  }

  function toggleCompare() {
    var v = viewer();
    if (!v) return;
    var on = v.classList.toggle("is-comparing");
    v.querySelectorAll("[data-panel=original], [data-panel=counterfactual]").forEach(function (p) { p.hidden = on; });
    var cmp = v.querySelector("[data-panel=compare]");
    if (cmp) cmp.hidden = !on;
    var b = document.querySelector("[data-action=compare]");
    if (b) b.setAttribute("aria-pressed", String(on));
    var max = v.querySelector(".panel.is-max");
    if (max && max.hidden) { max.classList.remove("is-max"); (on ? cmp : v.querySelector("[data-panel=original]")).classList.add("is-max"); }
    applyView();
  }

  function updateSwipe() {
    var v = viewer();
    var slider = v && v.querySelector("[data-swipe]");
    var after = v && v.querySelector("[data-swipe-after]");
    var line = v && v.querySelector("[data-swipe-line]");
    if (!slider || !after) return;
    var f = Number(slider.value) / 100;             // line position, fraction of the viewport width
    var x = (f - view.tx) / view.scale;              // the same position in the (untransformed) stage
    var pct = Math.max(0, Math.min(100, x * 100));
    after.style.clipPath = "inset(0 0 0 " + pct + "%)";
    if (line) line.style.left = (f * 100) + "%";
  }
  document.addEventListener("input", function (e) {
    if (e.target.matches && e.target.matches("[data-swipe]")) updateSwipe();
  });

  // ---- screen use: one panel maximised, full screen, the form hidden ---------------------------------------
  function toggleMaximise(panel) {
    var v = viewer();
    if (!v) return;
    var current = v.querySelector(".panel.is-max");
    if (current && (!panel || panel === current)) {
      current.classList.remove("is-max");
      v.classList.remove("is-maximised");
    } else {
      var target = panel || (hoverPanel && v.contains(hoverPanel) && !hoverPanel.hidden ? hoverPanel : null) ||
        v.querySelector(".panel:not([hidden])");
      if (current) current.classList.remove("is-max");
      target.classList.add("is-max");
      v.classList.add("is-maximised");
    }
    pressed("[data-action=maximise]", v.classList.contains("is-maximised"));
    applyView();
    var max = v.querySelector(".panel.is-max"), bar = document.querySelector(".run-done > .toolbar");
    if (max && max.getBoundingClientRect().bottom > window.innerHeight) {
      // bring the whole panel into view, just under the (sticky) toolbar
      var top = max.getBoundingClientRect().top - (bar ? bar.getBoundingClientRect().height : 0) - 8;
      window.scrollBy(0, top);
    }
  }

  function toggleFullscreen() {
    var run = document.getElementById("run");
    if (!run) return;
    if (document.fullscreenElement) document.exitFullscreen();
    else if (run.requestFullscreen) run.requestFullscreen().catch(function () {});
  }
  document.addEventListener("fullscreenchange", function () {
    pressed("[data-action=fullscreen]", Boolean(document.fullscreenElement));
    setTimeout(applyView, 50);
  });

  var SIDEBAR_KEY = "vald-md.form-hidden";
  function applySidebar(hidden) {
    document.body.classList.toggle("form-hidden", hidden);
    pressed("[data-action=sidebar]", hidden);
    document.querySelectorAll("[data-action=sidebar]").forEach(function (b) {
      b.firstChild.textContent = hidden ? "Show form " : "Hide form ";
    });
  }
  function toggleSidebar() {
    var hidden = !document.body.classList.contains("form-hidden");
    try { window.localStorage.setItem(SIDEBAR_KEY, hidden ? "1" : ""); } catch (err) { /* private mode */ }
    applySidebar(hidden);
    applyView();
  }

  // ---- keyboard ---------------------------------------------------------------------------------------------
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target;
    var typing = t.isContentEditable || t.tagName === "TEXTAREA" || t.tagName === "SELECT" ||
      (t.tagName === "INPUT" && ["range", "radio", "checkbox", "button", "submit", "file"].indexOf(t.type) < 0);
    if (typing || !viewer()) return;
    var key = e.key;
    if (key === "o" || key === "O") toggleOverlay();
    else if (key === "l" || key === "L") toggleLungOutline();
    else if (key === "c" || key === "C") toggleCompare();
    else if (key === "F") toggleFullscreen();
    else if (key === "f") viewerAction("fit");
    else if (key === "a" || key === "A") oneToOne();
    else if (key >= "1" && key <= "9" && pix.facts && Number(key) <= pix.facts.preset_keys) applyWindowPreset(Number(key) - 1);
    else if (key === "i" || key === "I") viewerAction("invert");
    else if (key === "r" || key === "R") resetDisplay();
    else if (key === "w" || key === "W") setTool("wl");
    else if (key === "p" || key === "P") setTool("pan");
    else if (key === "d" || key === "D") setTool("measure");
    else if (key === "h" || key === "H") viewerAction("flip-h");
    else if (key === "v" || key === "V") viewerAction("flip-v");
    else if (key === "]") viewerAction("rotate-right");
    else if (key === "[") viewerAction("rotate-left");
    else if (key === "m" || key === "M") toggleMaximise(null);
    else if (key === "s" || key === "S") toggleSidebar();
    else if (key === "Escape" && (measure || viewer().classList.contains("is-maximised"))) {
      if (measure) { measure = null; drawMeasure(); } else toggleMaximise(null);
    }
    else if (key === "+" || key === "=") zoomAt(1.25, 0.5, 0.5);
    else if (key === "-" || key === "_") zoomAt(0.8, 0.5, 0.5);
    else if ((key === "ArrowLeft" || key === "ArrowRight") && viewer().classList.contains("is-comparing") &&
             t.tagName !== "INPUT") {
      var s = viewer().querySelector("[data-swipe]");
      s.value = Number(s.value) + (key === "ArrowLeft" ? -2 : 2);
      updateSwipe();
    } else return;
    e.preventDefault();
  });

  // ---- progress: server-sent events, else polling -------------------------------------------------------------
  function pollInstead(run) {
    if (!run || !run.isConnected || run.getAttribute("data-polling")) return;
    run.setAttribute("data-polling", "1");
    htmx.ajax("GET", run.getAttribute("data-poll-url"), { target: run, swap: "outerHTML" });
  }
  document.addEventListener("htmx:sseError", function (e) {
    var run = e.target.closest && e.target.closest("[data-poll-url]");
    if (!run) return;
    var n = Number(run.getAttribute("data-sse-errors") || 0) + 1;
    run.setAttribute("data-sse-errors", String(n));
    if (n >= 3) pollInstead(run);
  });

  // ---- messages -------------------------------------------------------------------------------------------------
  document.addEventListener("htmx:beforeRequest", function (e) {
    var form = e.target.closest && e.target.closest("#review-form");
    var msgs = document.getElementById("messages");
    if (form && msgs && e.target === form) msgs.innerHTML = "";
  });

  // ---- initialise new content ---------------------------------------------------------------------------------
  function init(root) {
    updateOutputs(document);
    if (fileChangedSinceSubmit && root.id === "run") markStale(root);
    if (root.querySelector && (root.matches("[data-viewer]") || root.querySelector("[data-viewer]"))) {
      view = { scale: 1, tx: 0, ty: 0, rot: 0, flipH: false, flipV: false };
      measure = null;
      setTool(tool);
      applyLungOutline();
      loadPixels(viewer());
      viewer().querySelectorAll("img").forEach(function (img) {
        if (!img.complete) img.addEventListener("load", applyView, { once: true });
      });
      applyView();
    }
    if (typeof window.EventSource === "undefined") {
      root.querySelectorAll && root.querySelectorAll("[data-poll-url]").forEach(pollInstead);
    }
  }

  try { applySidebar(window.localStorage.getItem(SIDEBAR_KEY) === "1"); } catch (err) { /* private mode */ }

  if (window.htmx) {
    htmx.onLoad(init);
  } else {
    document.addEventListener("DOMContentLoaded", function () { init(document.body); });
  }
})();
