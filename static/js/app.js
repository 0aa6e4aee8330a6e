/* VALD-MD review page behaviour. No inline scripts or handlers anywhere (CSP script-src 'self'); everything
   is wired here by delegation or in htmx.onLoad, so content swapped in by htmx works the same as the page.

   - upload: drag-and-drop onto the drop zone feeds the file input (htmx then posts it to /inspect)
   - form: prompt chips, slider read-outs, effective steps = int(steps * strength), "reuse seed"
   - viewer: synchronised zoom/pan across panels, fit and 1:1, window/level (CSS filter), overlay toggle,
     lung outline layer on/off (the overlay form's checkbox; htmx sends it too, for the export links),
     before/after swipe compare
   - keyboard: o overlay, l lung outline, c compare, f fit, 1 one-to-one, + / - zoom, arrows move the swipe
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

  document.addEventListener("click", function (e) {
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
    if (t && (t.id === "review-form" || (t.closest && t.closest(".history-item")))) fileChangedSinceSubmit = false;
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

  // ---- viewer: shared zoom/pan -----------------------------------------------------------------------------
  // One view state for every panel. Translation is stored as a fraction of the viewport size so panels of
  // different sizes (compare mode) still show the same region.
  var view = { scale: 1, tx: 0, ty: 0 };
  var MIN_SCALE = 1, MAX_SCALE = 32;

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

  function applyView() {
    clampView();
    var v = viewer();
    if (!v) return;
    v.querySelectorAll("[data-viewport]").forEach(function (vp) {
      var stage = vp.querySelector("[data-stage]");
      var w = vp.clientWidth, h = vp.clientHeight;
      stage.style.transform = "translate(" + (view.tx * w) + "px," + (view.ty * h) + "px) scale(" + view.scale + ")";
    });
    v.classList.toggle("is-zoomed", view.scale > 1.001);
    updateSwipe();
    var label = document.querySelector("[data-zoom-level]");
    if (label) {
      var m = magnification();
      label.textContent = view.scale <= 1.001 ? "fit" + (m ? " (" + Math.round(m * 100) + " %)" : "") : Math.round(m * 100) + " %";
    }
  }

  function firstImageBox() {
    // rendered size of the image inside the first visible viewport at scale 1 (object-fit: contain)
    var vp = visibleViewports()[0];
    var img = vp && vp.querySelector("img");
    if (!img || !img.naturalWidth) return null;
    var w = vp.clientWidth, h = vp.clientHeight;
    var fit = Math.min(w / img.naturalWidth, h / img.naturalHeight);
    return { natural: img.naturalWidth, rendered: img.naturalWidth * fit, vp: vp };
  }

  function magnification() {
    var box = firstImageBox();
    if (!box) return null;
    return view.scale * box.rendered * (window.devicePixelRatio || 1) / box.natural;
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
    var box = firstImageBox();
    if (!box) return;
    var target = box.natural / (box.rendered * (window.devicePixelRatio || 1));
    if (target <= 1) { view = { scale: 1, tx: 0, ty: 0 }; applyView(); return; }
    zoomAt(target / view.scale, 0.5, 0.5);
  }

  function viewerAction(action, button) {
    if (action === "fit") { view = { scale: 1, tx: 0, ty: 0 }; applyView(); }
    else if (action === "one-to-one") oneToOne();
    else if (action === "zoom-in") zoomAt(1.25, 0.5, 0.5);
    else if (action === "zoom-out") zoomAt(0.8, 0.5, 0.5);
    else if (action === "compare") toggleCompare();
    else if (action === "overlay") toggleOverlay();
    else if (action === "wl-reset") {
      document.querySelectorAll("[data-wl]").forEach(function (r) { r.value = r.getAttribute("data-wl") === "level" ? 0 : 100; });
      applyWindowLevel();
    }
  }

  document.addEventListener("wheel", function (e) {
    var vp = e.target.closest && e.target.closest("[data-viewport]");
    if (!vp) return;
    e.preventDefault();
    var r = vp.getBoundingClientRect();
    zoomAt(e.deltaY < 0 ? 1.15 : 1 / 1.15, (e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height);
  }, { passive: false });

  var drag = null;
  document.addEventListener("pointerdown", function (e) {
    var vp = e.target.closest && e.target.closest("[data-viewport]");
    if (!vp || e.button !== 0) return;
    drag = { x: e.clientX, y: e.clientY, tx: view.tx, ty: view.ty, w: vp.clientWidth, h: vp.clientHeight };
    vp.setPointerCapture(e.pointerId);
    vp.classList.add("is-panning");
  });
  document.addEventListener("pointermove", function (e) {
    if (!drag) return;
    view.tx = drag.tx + (e.clientX - drag.x) / drag.w;
    view.ty = drag.ty + (e.clientY - drag.y) / drag.h;
    applyView();
  });
  document.addEventListener("pointerup", function (e) {
    if (!drag) return;
    drag = null;
    document.querySelectorAll(".is-panning").forEach(function (el) { el.classList.remove("is-panning"); });
  });
  window.addEventListener("resize", function () { applyView(); });

  // ---- window / level ---------------------------------------------------------------------------------------
  function applyWindowLevel() {
    var v = viewer();
    if (!v) return;
    var level = Number((document.querySelector("[data-wl=level]") || { value: 0 }).value);
    var width = Number((document.querySelector("[data-wl=width]") || { value: 100 }).value);
    // level shifts brightness, a narrower width raises contrast (display-only; the run is unchanged)
    v.style.setProperty("--wl-filter", "brightness(" + (1 + level / 100) + ") contrast(" + (100 / width) + ")");
  }
  document.addEventListener("input", function (e) {
    if (e.target.matches && e.target.matches("[data-wl]")) applyWindowLevel();
    if (e.target.matches && e.target.matches("[data-swipe]")) updateSwipe();
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
    else if (key === "f" || key === "F") viewerAction("fit");
    else if (key === "1") oneToOne();
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
      view = { scale: 1, tx: 0, ty: 0 };
      applyWindowLevel();
      applyLungOutline();
      viewer().querySelectorAll("img").forEach(function (img) {
        if (!img.complete) img.addEventListener("load", applyView, { once: true });
      });
      applyView();
    }
    if (typeof window.EventSource === "undefined") {
      root.querySelectorAll && root.querySelectorAll("[data-poll-url]").forEach(pollInstead);
    }
  }

  if (window.htmx) {
    htmx.onLoad(init);
  } else {
    document.addEventListener("DOMContentLoaded", function () { init(document.body); });
  }
})();
