/* Infer-OS dashboard: polls /v1/metrics and /v1/history every 2 s and renders tiles and
 * SVG charts. No dependencies, no network beyond this agent (CSP: same origin only).
 *
 * Every number element carries data-metric (its path in GET /v1/metrics), data-value (the
 * raw JSON value rendered) and data-format (how the text is formatted):
 *   f1/f2/f3  fixed decimals     int  integer     mb  MB, 3 decimals below 10 else 1
 *   signed3   +0.123 / -0.123    pct  fraction 0..1 as "23%"      str  as is
 *   bytes     "12.3 MB" (10^6) / "1.2 GB" (10^9) / "512 B"
 * Nulls render as "—" (or "n/a" for devices). <body data-state="ready"> after a render.
 */
(function () {
  "use strict";
  var REFRESH_MS = 2000;
  var HISTORY_LIMIT = 120;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var LEVEL_NAMES = { L0: "L0 float16", L1: "L1 INT8", L2: "L2 INT4", L3: "L3 evicted" };

  function $(id) { return document.getElementById(id); }

  function lookup(obj, path) {
    var cur = obj;
    var parts = path.split(".");
    for (var i = 0; i < parts.length; i++) {
      if (cur === null || typeof cur !== "object" || !(parts[i] in cur)) return null;
      cur = cur[parts[i]];
    }
    return cur === undefined ? null : cur;
  }

  function format(v, fmt) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "—";
    if (fmt === "str") return String(v);
    var n = Number(v);
    switch (fmt) {
      case "f1": return n.toFixed(1);
      case "f2": return n.toFixed(2);
      case "f3": return n.toFixed(3);
      case "int": return String(Math.round(n));
      case "mb": return n < 10 ? n.toFixed(3) : n.toFixed(1);
      case "signed3": return (n >= 0 ? "+" : "") + n.toFixed(3);
      case "pct": return Math.round(n * 100) + "%";
      case "v": return "v" + Math.round(n);
      case "bytes": return n >= 1e9 ? (n / 1e9).toFixed(1) + " GB" : n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" :
        n >= 1e3 ? (n / 1e3).toFixed(1) + " kB" : Math.round(n) + " B";
      default: return String(v);
    }
  }

  function renderNumbers(m) {
    var els = document.querySelectorAll("[data-metric]");
    for (var i = 0; i < els.length; i++) {
      var el = els[i];
      var v = lookup(m, el.getAttribute("data-metric"));
      el.setAttribute("data-value", JSON.stringify(v));
      var fmt = el.getAttribute("data-format") || "str";
      el.textContent = (v === null && el.classList.contains("reading")) ? "n/a" : format(v, fmt);
    }
  }

  function svg(tag, attrs, parent) {
    var el = document.createElementNS(SVG_NS, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) el.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(el);
    return el;
  }

  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); }

  function hhmmss(t) {
    var d = new Date(t * 1000);
    function p(x) { return (x < 10 ? "0" : "") + x; }
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  /* A line chart of points [{x: unix seconds, y: number}] into container (SVG, viewBox units = px). */
  function lineChart(container, points, digits, unit) {
    clear(container);
    var W = Math.max(container.clientWidth || 600, 200), H = Math.max(container.clientHeight || 150, 100);
    var padL = 48, padR = 12, padT = 10, padB = 22;
    var root = svg("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img" }, container);
    container.setAttribute("data-points", String(points.length));
    if (!points.length) {
      svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "class": "empty" }, root).textContent = "no reports yet";
      return;
    }
    var xs = points.map(function (p) { return p.x; }), ys = points.map(function (p) { return p.y; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var ymax = Math.max.apply(null, ys) * 1.1 || 1;
    var sx = function (x) { return padL + (x1 === x0 ? (W - padL - padR) / 2 : (x - x0) / (x1 - x0) * (W - padL - padR)); };
    var sy = function (y) { return padT + (1 - y / ymax) * (H - padT - padB); };
    svg("line", { x1: padL, y1: H - padB, x2: W - padR, y2: H - padB, "class": "axis" }, root);
    svg("line", { x1: padL, y1: padT, x2: padL, y2: H - padB, "class": "axis" }, root);
    svg("text", { x: padL - 6, y: padT + 8, "text-anchor": "end" }, root).textContent = format(ymax, digits);
    svg("text", { x: padL - 6, y: H - padB, "text-anchor": "end" }, root).textContent = "0";
    svg("text", { x: padL, y: H - 6, "text-anchor": "start" }, root).textContent = hhmmss(x0);
    svg("text", { x: W - padR, y: H - 6, "text-anchor": "end" }, root).textContent = hhmmss(x1);
    var d = "", area = "";
    points.forEach(function (p, i) {
      var cmd = (i ? "L" : "M") + sx(p.x).toFixed(1) + "," + sy(p.y).toFixed(1);
      d += cmd;
    });
    area = d + "L" + sx(points[points.length - 1].x).toFixed(1) + "," + (H - padB) + "L" + sx(points[0].x).toFixed(1) + "," + (H - padB) + "Z";
    svg("path", { d: area, "class": "area" }, root);
    svg("path", { d: d, "class": "line" }, root);
    var last = points[points.length - 1];
    svg("circle", { cx: sx(last.x), cy: sy(last.y), r: 3.5, "class": "dot" }, root);
    var label = svg("text", { x: Math.min(sx(last.x), W - padR), y: Math.max(sy(last.y) - 8, padT + 8), "text-anchor": "end" }, root);
    label.textContent = format(last.y, digits) + " " + unit;
  }

  function renderCharts(history) {
    var items = (history && history.items) || [];
    var tps = [], ttft = [], kv = [];
    items.forEach(function (it) {
      var s = it.stats || {};
      var x = s.end_time;
      var rate = s.decode_tps > 0 ? s.decode_tps : (s.total_ms > 0 ? s.generated_tokens / (s.total_ms / 1000) : null);
      if (rate !== null) tps.push({ x: x, y: rate });
      if (s.ttft_ms !== null && s.ttft_ms !== undefined) ttft.push({ x: x, y: s.ttft_ms });
      if (s.kv) kv.push({ x: x, y: (s.kv.total_bytes || 0) / 1e6 });
    });
    lineChart($("chart-tps"), tps, "f1", "tok/s");
    lineChart($("chart-ttft"), ttft, "f1", "ms");
    lineChart($("chart-kv"), kv, "mb", "MB");
  }

  function renderLevels(kvStats) {
    var box = $("kv-levels"), legend = $("kv-legend");
    clear(box); clear(legend);
    var dist = (kvStats && kvStats.level_distribution) || {};
    var keys = Object.keys(dist).sort();
    var total = keys.reduce(function (a, k) { return a + dist[k]; }, 0);
    box.setAttribute("data-total", String(total));
    var root = svg("svg", { viewBox: "0 0 1000 26", preserveAspectRatio: "none" }, box);
    var x = 0;
    keys.forEach(function (k) {
      var w = total ? dist[k] / total * 1000 : 0;
      var rect = svg("rect", { x: x, y: 0, width: w, height: 26, "class": LEVEL_NAMES[k] ? "seg-" + k : "seg-other" }, root);
      rect.setAttribute("data-level", k);
      svg("title", {}, rect).textContent = (LEVEL_NAMES[k] || k) + ": " + dist[k] + " tokens";
      x += w;
    });
    if (!keys.length) {
      var li = document.createElement("li");
      li.textContent = "no quantized-store reports in the window";
      legend.appendChild(li);
    }
    keys.forEach(function (k) {
      var li = document.createElement("li");
      li.setAttribute("data-level", k);
      li.setAttribute("data-value", String(dist[k]));
      var sw = document.createElement("span");
      sw.className = "swatch " + (LEVEL_NAMES[k] ? "sw-" + k : "sw-other");
      li.appendChild(sw);
      li.appendChild(document.createTextNode((LEVEL_NAMES[k] || k) + ": " + dist[k] + " (" + (total ? Math.round(dist[k] / total * 100) : 0) + "%)"));
      legend.appendChild(li);
    });
  }

  function renderDevices(dev) {
    ["cpu", "npu", "dml"].forEach(function (name) {
      var li = $("dev-" + name);
      var v = dev ? dev[name + "_utilization"] : null;
      var fill = li.querySelector(".fill");
      if (v === null || v === undefined) {
        li.classList.add("na");
        fill.style.width = "0";
        li.title = (dev && dev.notes && dev.notes[name + "_utilization"]) || "not available";
      } else {
        li.classList.remove("na");
        fill.style.width = Math.max(0, Math.min(100, v * 100)).toFixed(1) + "%";
        li.title = "";
      }
    });
    var notes = dev && dev.notes ? Object.keys(dev.notes) : [];
    $("device-note").textContent = notes.length
      ? notes.map(function (k) { return k.replace("_utilization", "").toUpperCase(); }).join(", ").replace("DML", "iGPU (DML)") + ": " + dev.notes[notes[0]] + "."
      : "";
  }

  function renderPool(mem) {
    var box = $("pool");
    clear(box);
    var pool = mem && mem.memory_pool;
    if (!pool || typeof pool !== "object") {
      var p = document.createElement("p");
      p.className = "note";
      p.textContent = "not available on this platform (no resource manager numbers)";
      box.appendChild(p);
      box.setAttribute("data-available", "false");
      return;
    }
    box.setAttribute("data-available", "true");
    var used = pool.used_bytes, total = pool.total_bytes;
    if (typeof used === "number" && typeof total === "number" && total > 0) {
      var meter = document.createElement("div");
      meter.className = "meter";
      var fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = Math.min(100, used / total * 100).toFixed(1) + "%";
      meter.appendChild(fill);
      box.appendChild(meter);
    }
    var dl = document.createElement("dl");
    dl.className = "kv";
    Object.keys(pool).forEach(function (k) {
      var dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k;
      var v = pool[k];
      dd.textContent = (typeof v === "number" && /bytes$/.test(k)) ? format(v / 1e6, "mb") + " MB" : String(v);
      dl.appendChild(dt); dl.appendChild(dd);
    });
    box.appendChild(dl);
  }

  function renderFallback(res) {
    var fb = (res && res.fallback) || {}, per = fb.per_instance || {};
    var active = [];
    Object.keys(per).forEach(function (i) { (per[i].active || []).forEach(function (r) { if (active.indexOf(r) < 0) active.push(r); }); });
    var pill = $("fallback-state");
    pill.setAttribute("data-critical", fb.critical ? "true" : "false");
    pill.setAttribute("data-active", active.join(","));
    pill.className = "pill " + (fb.critical ? "pill-bad" : active.length ? "pill-warn" : "pill-ok");
    pill.textContent = fb.critical ? "critical: " + active.join(", ") : active.length ? "fallback: " + active.join(", ") : "normal";
    var ul = $("fallback-events");
    clear(ul);
    ((res && res.events) || []).slice(-8).reverse().forEach(function (e) {
      var li = document.createElement("li");
      li.setAttribute("data-kind", e.kind);
      li.textContent = hhmmss(e.timestamp) + " " + e.kind + " " + e.reason + (e.detail ? ": " + e.detail : "");
      ul.appendChild(li);
    });
  }

  function renderStatus(m) {
    var st = m.optimization_status || {};
    var dl = $("opt-status");
    clear(dl);
    [["kv_quantization_active", "KV quantization"], ["io_binding_enabled", "IO binding (policy)"],
     ["hybrid_scheduling_active", "hybrid scheduling"], ["baseline_mode", "baseline mode"]].forEach(function (pair) {
      var dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = pair[1];
      dd.textContent = st[pair[0]] ? "yes" : "no";
      dd.className = st[pair[0]] ? "yes" : "no";
      dd.setAttribute("data-status", pair[0]);
      dl.appendChild(dt); dl.appendChild(dd);
    });
    var providers = Object.keys(st.providers || {});
    var dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = "providers";
    dd.textContent = providers.length ? providers.map(function (p) { return p.replace("ExecutionProvider", "") + " ×" + st.providers[p]; }).join(", ") : "—";
    dl.appendChild(dt); dl.appendChild(dd);
    $("baseline-badge").hidden = !st.baseline_mode;
  }

  function setConn(ok, text) {
    var c = $("conn");
    c.className = "pill " + (ok ? "pill-ok" : "pill-bad");
    c.setAttribute("data-conn", ok ? "live" : "down");
    c.textContent = text;
  }

  function getJSON(url) {
    return fetch(url, { cache: "no-store", headers: { Accept: "application/json" } }).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }

  var renders = 0;
  function refresh() {
    var pm = getJSON("/v1/metrics").then(function (m) {
      renderNumbers(m);
      renderLevels(m.kv_stats);
      renderDevices(m.device_utilization);
      renderPool(m.memory);
      renderStatus(m);
      renderFallback(m.resources);
      var upd = $("updated");
      upd.textContent = hhmmss(m.unix_time);
      upd.setAttribute("data-value", String(m.unix_time));
      upd.setAttribute("datetime", m.timestamp);
      setConn(true, "live");
      return true;
    });
    var ph = getJSON("/v1/history?limit=" + HISTORY_LIMIT).then(renderCharts);
    Promise.all([pm, ph]).then(function () {
      renders += 1;
      document.body.setAttribute("data-renders", String(renders));
      document.body.setAttribute("data-state", "ready");
    }).catch(function (e) {
      setConn(false, "agent unreachable");
      document.body.setAttribute("data-error", String(e && e.message || e));
    });
  }

  /* theme: auto (system) -> dark -> light -> auto */
  var THEMES = ["auto", "dark", "light"];
  var LABELS = { auto: "◐ auto", dark: "☾ dark", light: "☀ light" };
  function applyTheme(t) {
    if (t === "auto") document.documentElement.removeAttribute("data-theme");
    else document.documentElement.setAttribute("data-theme", t);
    var b = $("theme-toggle");
    b.textContent = LABELS[t];
    b.setAttribute("data-theme-choice", t);
    b.title = "theme: " + (t === "auto" ? "follow system" : t);
  }
  function storedTheme() {
    try { return localStorage.getItem("inferos-theme") || "auto"; } catch (e) { return "auto"; }
  }
  $("theme-toggle").addEventListener("click", function () {
    var next = THEMES[(THEMES.indexOf($("theme-toggle").getAttribute("data-theme-choice")) + 1) % THEMES.length];
    try { localStorage.setItem("inferos-theme", next); } catch (e) { /* storage disabled */ }
    applyTheme(next);
  });
  var params = new URLSearchParams(location.search);
  applyTheme(THEMES.indexOf(params.get("theme")) >= 0 ? params.get("theme") : storedTheme());

  refresh();
  setInterval(refresh, REFRESH_MS);
})();
