// pipeopt dashboard: poll /metrics and update the page in place.
//
// Every value from the server is written with textContent or setAttribute on
// elements built here, never parsed as HTML: task names and error texts are
// data, not markup. The token (if the page was opened with ?token=...) is sent
// as an Authorization header, not in the polled URL.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const STATES = ["pending", "ready", "running", "retrying", "succeeded",
                  "failed", "skipped", "cancelled", "cached"];
  const token = new URLSearchParams(window.location.search).get("token");
  const headers = { Accept: "application/json" };
  if (token) {
    headers.Authorization = "Bearer " + token;
  }

  let refreshMs = 1000;
  let stateFilter = null;
  let lastDoc = null;
  const taskRows = new Map(); // task name -> {row, cells}
  let taskOrder = "";

  function $(id) {
    return document.getElementById(id);
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== value) {
      node.textContent = value;
    }
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function fmtNumber(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) {
      return "–";
    }
    return Number(value).toLocaleString(undefined, {
      maximumFractionDigits: digits,
      minimumFractionDigits: 0,
    });
  }

  function fmtDuration(ms) {
    if (ms === null || ms === undefined) {
      return "–";
    }
    if (ms < 1) {
      return Math.round(ms * 1000) + " µs";
    }
    if (ms < 1000) {
      return ms.toFixed(ms < 10 ? 1 : 0) + " ms";
    }
    const seconds = ms / 1000;
    if (seconds < 60) {
      return seconds.toFixed(2) + " s";
    }
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) {
      return minutes + "m " + Math.floor(seconds % 60) + "s";
    }
    return Math.floor(minutes / 60) + "h " + (minutes % 60) + "m";
  }

  function fmtElapsed(seconds) {
    return seconds === null || seconds === undefined ? "–" : fmtDuration(seconds * 1000);
  }

  function fmtLatency(ms) {
    if (ms === null || ms === undefined) {
      return ["–", "per task"];
    }
    if (ms >= 1000) {
      return [fmtNumber(ms / 1000, 2), "s per task"];
    }
    return [fmtNumber(ms, ms < 10 ? 2 : 1), "ms per task"];
  }

  // -- header and tiles ------------------------------------------------------

  function renderSummary(doc) {
    setText($("pipeline"), doc.pipeline === null ? "waiting for a run…" : doc.pipeline);
    const status = doc.status === null ? "idle" : doc.status;
    const badge = $("status");
    setText(badge, status);
    badge.className = "badge state-" + status;
    setText($("run-id"), doc.run_id === null ? "–" : doc.run_id);
    setText($("elapsed"), fmtElapsed(doc.elapsed_s));
    const updated = $("last-update");
    updated.setAttribute("datetime", doc.last_update);
    setText(updated, new Date(doc.last_update).toLocaleTimeString());

    setText($("throughput"), fmtNumber(doc.throughput_per_minute, 1));
    const latency = fmtLatency(doc.avg_latency_ms);
    setText($("latency"), latency[0]);
    setText($("latency-unit"), latency[1]);
    setText($("active"), fmtNumber(doc.tasks_active, 0));
    setText($("backlog"), fmtNumber(doc.critical_backlog, 0));
    setText($("finished"), fmtNumber(doc.tasks_finished, 0));
    setText($("total"), "of " + fmtNumber(doc.tasks_total, 0));
    setText($("failures"), fmtNumber(doc.failures_total, 0));
    setText($("retries"), fmtNumber(doc.retries_total, 0));
    $("failures").classList.toggle("bad", doc.failures_total > 0);
    $("backlog").classList.toggle("warn", doc.critical_backlog > 0);

    const progress = $("progress");
    progress.max = Math.max(1, doc.tasks_total);
    progress.value = doc.tasks_finished;
  }

  // -- state chips (click to filter the table) -----------------------------------

  function renderCounts(doc) {
    const box = $("counts");
    if (box.childElementCount === 0) {
      for (const state of STATES) {
        const chip = el("button", "chip state-" + state);
        chip.type = "button";
        chip.dataset.state = state;
        chip.append(el("span", "chip-name", state), el("span", "chip-count", "0"));
        chip.addEventListener("click", function () {
          stateFilter = stateFilter === state ? null : state;
          if (lastDoc) {
            renderTasks(lastDoc);
            renderCounts(lastDoc);
          }
        });
        box.append(chip);
      }
    }
    for (const chip of box.children) {
      const state = chip.dataset.state;
      const count = doc.counts[state] || 0;
      setText(chip.lastChild, count);
      chip.classList.toggle("zero", count === 0);
      chip.classList.toggle("active", stateFilter === state);
      chip.setAttribute("aria-pressed", stateFilter === state ? "true" : "false");
    }
  }

  // -- task table ------------------------------------------------------------

  function makeTaskRow(name) {
    const row = el("tr");
    const cells = {
      name: el("td", "name", name),
      state: el("span", "badge"),
      criticality: el("td", "crit"),
      attempts: el("td", "num"),
      duration: el("td", "num"),
      error: el("td", "error"),
    };
    const stateCell = el("td");
    stateCell.append(cells.state);
    row.append(cells.name, stateCell, cells.criticality, cells.attempts, cells.duration,
               cells.error);
    return { row: row, cells: cells, state: null };
  }

  function renderTasks(doc) {
    const tbody = $("tasks").tBodies[0];
    const order = doc.tasks.map(function (t) { return t.name; }).join("\u0000");
    if (order !== taskOrder) {
      taskRows.clear();
      const rows = [];
      for (const task of doc.tasks) {
        const entry = makeTaskRow(task.name);
        taskRows.set(task.name, entry);
        rows.push(entry.row);
      }
      tbody.replaceChildren.apply(tbody, rows);
      taskOrder = order;
    }
    for (const task of doc.tasks) {
      const entry = taskRows.get(task.name);
      const cells = entry.cells;
      if (entry.state !== task.state) {
        entry.state = task.state;
        setText(cells.state, task.state);
        cells.state.className = "badge state-" + task.state;
        entry.row.className = "row-" + task.state;
      }
      entry.row.hidden = stateFilter !== null && task.state !== stateFilter;
      setText(cells.criticality, task.criticality);
      cells.criticality.className = "crit crit-" + task.criticality;
      setText(cells.attempts, task.attempts);
      setText(cells.duration, fmtDuration(task.duration_ms));
      setText(cells.error, task.error);
      if (task.error) {
        cells.error.title = task.error;
      } else {
        cells.error.removeAttribute("title");
      }
    }
    $("tasks-empty").hidden = doc.tasks.length > 0;
  }

  // -- breakers and batches ----------------------------------------------------

  function renderPairs(tableId, emptyId, pairs, decorate) {
    const tbody = $(tableId).tBodies[0];
    const rows = [];
    for (const pair of pairs) {
      const row = el("tr");
      const value = el("td", "num", pair[1]);
      row.append(el("td", "name", pair[0]), value);
      if (decorate) {
        decorate(value, pair);
      }
      rows.push(row);
    }
    tbody.replaceChildren.apply(tbody, rows);
    $(emptyId).hidden = pairs.length > 0;
    $(tableId).hidden = pairs.length === 0;
  }

  function renderBreakers(doc) {
    const pairs = Object.keys(doc.breakers).sort().map(function (name) {
      return [name, doc.breakers[name].state];
    });
    renderPairs("breakers", "breakers-empty", pairs, function (cell, pair) {
      cell.className = "breaker breaker-" + pair[1];
    });
  }

  function renderBatches(doc) {
    const pairs = Object.keys(doc.batch_sizes).sort().map(function (name) {
      return [name, fmtNumber(doc.batch_sizes[name], 0)];
    });
    renderPairs("batches", "batches-empty", pairs, null);
  }

  // -- chart -----------------------------------------------------------------

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const key of Object.keys(attrs)) {
      node.setAttribute(key, String(attrs[key]));
    }
    return node;
  }

  function niceMax(value) {
    if (!(value > 0)) {
      return 1;
    }
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (value <= step * power) {
        return step * power;
      }
    }
    return 10 * power;
  }

  function renderChart(doc) {
    const chart = $("chart");
    const width = Math.max(320, Math.round(chart.clientWidth || 800));
    const height = 220;
    const pad = { left: 52, right: 56, top: 14, bottom: 26 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    chart.setAttribute("viewBox", "0 0 " + width + " " + height);
    const parts = [];
    const points = doc.history || [];
    const now = points.length ? points[points.length - 1].t : 0;
    // Fit the samples we have (at least 20 s), up to the server's whole history.
    const span = points.length > 1 ? Math.max(20, now - points[0].t) : 20;
    const t0 = now - span;
    const maxThroughput = niceMax(Math.max.apply(null, [0].concat(points.map(function (p) {
      return p.throughput_per_minute;
    }))));
    const maxLatency = niceMax(Math.max.apply(null, [0].concat(points.map(function (p) {
      return p.recent_latency_ms || 0;
    }))));
    const x = function (t) { return pad.left + ((t - t0) / span) * plotW; };
    const yT = function (v) { return pad.top + plotH - (v / maxThroughput) * plotH; };
    const yL = function (v) { return pad.top + plotH - (v / maxLatency) * plotH; };

    for (let i = 0; i <= 4; i++) {
      const y = pad.top + (plotH * i) / 4;
      parts.push(svg("line", { x1: pad.left, x2: pad.left + plotW, y1: y, y2: y, class: "grid" }));
      const left = svg("text", { x: pad.left - 8, y: y + 4, class: "axis axis-left" });
      left.textContent = fmtNumber(maxThroughput * (1 - i / 4), 1);
      const right = svg("text", { x: pad.left + plotW + 8, y: y + 4, class: "axis axis-right" });
      right.textContent = fmtNumber(maxLatency * (1 - i / 4), 1);
      parts.push(left, right);
    }
    const tickEvery = [5, 10, 15, 30, 60, 120, 300, 600].find(function (step) {
      return span / step <= 6;
    }) || 1200;
    for (let ago = 0; ago <= span; ago += tickEvery) {
      const tx = x(now - ago);
      const label = svg("text", { x: tx, y: height - 6, class: "axis axis-x" });
      label.textContent = ago === 0 ? "now" : ago >= 60 ? "-" + ago / 60 + "m" : "-" + ago + "s";
      parts.push(label);
    }
    if (points.length > 0) {
      const throughput = points.map(function (p) {
        return x(p.t).toFixed(1) + "," + yT(p.throughput_per_minute).toFixed(1);
      });
      const first = x(points[0].t).toFixed(1);
      const last = x(points[points.length - 1].t).toFixed(1);
      const base = (pad.top + plotH).toFixed(1);
      parts.push(svg("polygon", {
        points: first + "," + base + " " + throughput.join(" ") + " " + last + "," + base,
        class: "area-throughput",
      }));
      parts.push(svg("polyline", { points: throughput.join(" "), class: "line-throughput" }));
      const latency = points.filter(function (p) {
        return p.recent_latency_ms !== null;
      }).map(function (p) {
        return x(p.t).toFixed(1) + "," + yL(p.recent_latency_ms).toFixed(1);
      });
      if (latency.length > 0) {
        parts.push(svg("polyline", { points: latency.join(" "), class: "line-latency" }));
      }
    } else {
      const empty = svg("text", { x: pad.left + plotW / 2, y: pad.top + plotH / 2, class: "axis axis-x" });
      empty.textContent = "collecting samples…";
      parts.push(empty);
    }
    chart.replaceChildren.apply(chart, parts);
  }

  // -- polling ---------------------------------------------------------------

  function setConnection(kind, text) {
    const conn = $("conn");
    conn.className = "conn conn-" + kind;
    setText(conn, text);
  }

  function render(doc) {
    lastDoc = doc;
    renderSummary(doc);
    renderCounts(doc);
    renderTasks(doc);
    renderBreakers(doc);
    renderBatches(doc);
    renderChart(doc);
  }

  async function poll() {
    try {
      const response = await fetch("/metrics", {
        headers: headers,
        cache: "no-store",
        credentials: "same-origin",
      });
      if (response.status === 401) {
        setConnection("error", "token required");
      } else if (!response.ok) {
        setConnection("error", "error " + response.status);
      } else {
        const doc = await response.json();
        if (typeof doc.refresh_interval === "number" && doc.refresh_interval > 0) {
          refreshMs = Math.max(100, doc.refresh_interval * 1000);
        }
        render(doc);
        setConnection("live", "live");
      }
    } catch (err) {
      setConnection("error", "offline, retrying");
    }
    window.setTimeout(poll, refreshMs);
  }

  window.addEventListener("resize", function () {
    if (lastDoc) {
      renderChart(lastDoc);
    }
  });

  poll();
})();
