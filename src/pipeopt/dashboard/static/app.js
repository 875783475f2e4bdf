// pipeopt run page: poll the run's JSON document and update the page in place.
//
// The same page serves a live run (the dashboard, data-api="/api/run") and a
// stored one (`pipeopt ui`, data-api="/api/runs/<id>"): both send the same
// document. Every value from the server is written with textContent or
// setAttribute on elements built here, never parsed as HTML: task names and
// error texts are data, not markup; control characters are shown as symbols.
// The token (if the page was opened with ?token=...) is sent as an
// Authorization header, not in the polled URL.
"use strict";

(function () {
  const STATES = ["pending", "ready", "running", "retrying", "succeeded",
                  "failed", "skipped", "cancelled", "cached"];
  // Failed and running tasks first, then the rest; pipeline order among peers.
  const RANK = { failed: 0, running: 1, retrying: 2, cancelled: 3, skipped: 4, ready: 5,
                 pending: 6, succeeded: 7, cached: 8 };
  const MAX_ROWS = 200;
  const visible = window.pipeopt.visible;
  const el = window.pipeopt.el;
  const setText = window.pipeopt.setText;
  const api = document.body.dataset.api || "/api/run";
  const query = new URLSearchParams(window.location.search);
  const token = query.get("token");
  const headers = { Accept: "application/json" };
  if (token) {
    headers.Authorization = "Bearer " + token;
  }

  let refreshMs = 1000;
  let stateFilter = null;
  let search = "";
  let lastDoc = null;
  let selected = query.get("task");
  let rowKey = "";
  const rowCache = new Map(); // task name -> {row, cells, state}
  const timeline = new window.PipeoptTimeline(
    $("timeline"), $("timeline-tip"), function (name) { select(name); }
  );

  function $(id) {
    return document.getElementById(id);
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

  function fmtTime(iso) {
    return iso ? new Date(iso).toLocaleTimeString() : "–";
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

  // -- header, banner and tiles ------------------------------------------------

  function renderSummary(doc) {
    setText($("pipeline"), doc.pipeline === null ? "waiting for a run…" : visible(doc.pipeline));
    const status = doc.status === null ? "idle" : doc.status;
    const badge = $("status");
    setText(badge, status);
    badge.className = "badge state-" + status;
    setText($("run-id"), doc.run_id === null ? "–" : visible(doc.run_id));
    setText($("elapsed"), fmtElapsed(doc.elapsed_s));
    const updated = $("last-update");
    updated.setAttribute("datetime", doc.last_update);
    setText(updated, fmtTime(doc.last_update));
    document.title = (doc.pipeline === null ? "pipeopt" : visible(doc.pipeline)) + " · " + status;

    const banner = $("finished-banner");
    const over = doc.status !== null && doc.status !== "running" && doc.status !== "crashed";
    if (over || doc.status === "crashed") {
      const text = doc.status === "crashed"
        ? "Run crashed: its process ended without recording the end; " +
          "this is what it recorded until then."
        : "Run finished: " + doc.status + " after " + fmtElapsed(doc.elapsed_s) +
          (doc.ended_at ? " (ended " + fmtTime(doc.ended_at) + ")" : "") + ".";
      setText(banner, text);
      banner.className = "banner banner-" + doc.status;
    }
    banner.hidden = !(over || doc.status === "crashed");

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

  // -- task table: failures first, filtered, searched, at most MAX_ROWS rows -----------

  function makeTaskRow(name) {
    const row = el("tr", "task-row");
    row.tabIndex = 0;
    const cells = {
      name: el("td", "name", visible(name)),
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
    row.addEventListener("click", function () { select(name); });
    row.addEventListener("keydown", function (event) {
      if (event.key === "Enter") {
        select(name);
      }
    });
    return { row: row, cells: cells, state: null };
  }

  function visibleTasks(doc) {
    const needle = search.toLowerCase();
    const picked = [];
    doc.tasks.forEach(function (task, index) {
      if (stateFilter !== null && task.state !== stateFilter) {
        return;
      }
      if (needle && task.name.toLowerCase().indexOf(needle) < 0) {
        return;
      }
      picked.push({ task: task, index: index });
    });
    picked.sort(function (a, b) {
      return (RANK[a.task.state] - RANK[b.task.state]) || (a.index - b.index);
    });
    return picked;
  }

  function renderTasks(doc) {
    const tbody = $("tasks").tBodies[0];
    const picked = visibleTasks(doc);
    const shown = picked.slice(0, MAX_ROWS);
    const key = shown.map(function (p) { return p.task.name; }).join("\u0000");
    if (key !== rowKey) {
      const rows = [];
      const keep = new Map();
      for (const p of shown) {
        const entry = rowCache.get(p.task.name) || makeTaskRow(p.task.name);
        keep.set(p.task.name, entry);
        rows.push(entry.row);
      }
      rowCache.clear();
      keep.forEach(function (entry, name) { rowCache.set(name, entry); });
      tbody.replaceChildren.apply(tbody, rows);
      rowKey = key;
    }
    for (const p of shown) {
      const task = p.task;
      const entry = rowCache.get(task.name);
      const cells = entry.cells;
      if (entry.state !== task.state) {
        entry.state = task.state;
        setText(cells.state, task.state);
        cells.state.className = "badge state-" + task.state;
      }
      entry.row.className = "task-row row-" + task.state +
        (task.name === selected ? " selected" : "");
      setText(cells.criticality, task.criticality);
      cells.criticality.className = "crit crit-" + task.criticality;
      setText(cells.attempts, task.attempts);
      setText(cells.duration, fmtDuration(task.duration_ms));
      setText(cells.error, visible(task.error));
      if (task.error) {
        cells.error.title = visible(task.error, true);
      } else {
        cells.error.removeAttribute("title");
      }
    }
    setText($("shown"), picked.length > shown.length
      ? "showing " + shown.length + " of " + picked.length + "; filter or search to narrow"
      : picked.length + " of " + doc.tasks.length + " tasks");
    $("tasks-empty").hidden = doc.tasks.length > 0;
  }

  // -- task details ---------------------------------------------------------------

  function select(name) {
    selected = name;
    $("details").hidden = false;
    setText($("d-name"), visible(name));
    if (lastDoc) {
      renderTasks(lastDoc);
    }
    loadDetails();
  }

  async function loadDetails() {
    if (selected === null) {
      return;
    }
    const name = selected;
    try {
      const response = await fetch(api + "/task?name=" + encodeURIComponent(name), {
        headers: headers, cache: "no-store", credentials: "same-origin",
      });
      if (response.ok && name === selected) {
        renderDetails(await response.json());
      }
    } catch (err) {
      // The next poll tries again.
    }
  }

  function renderDetails(task) {
    setText($("d-name"), visible(task.name));
    const badge = $("d-state");
    setText(badge, task.state);
    badge.className = "badge state-" + task.state;
    setText($("d-crit"), task.criticality);
    setText($("d-declared"), task.declared_criticality && task.declared_criticality !== task.criticality
      ? "(declared " + task.declared_criticality + ")" : "");
    setText($("d-group"), task.group === null || task.group === undefined ? "–" : visible(task.group));
    setText($("d-duration"), fmtDuration(task.duration_ms));
    setText($("d-description"), visible(task.description || ""));
    const deps = task.dependencies || [];
    const dependents = task.dependents || [];
    setText($("d-deps"), (deps.length ? "needs " + deps.map(function (d) { return visible(d); }).join(", ") : "no dependencies") +
      (dependents.length ? " · needed by " + dependents.length + " task(s)" : ""));

    const rows = (task.attempts_detail || []).map(function (a) {
      const row = el("tr", "attempt-" + a.outcome);
      row.append(el("td", "num", a.number), el("td", null, fmtTime(a.started_at)),
                 el("td", "num", fmtDuration(a.duration_ms)),
                 el("td", "outcome outcome-" + a.outcome, a.outcome),
                 el("td", "error", visible(a.error)));
      return row;
    });
    const body = $("d-attempts").tBodies[0];
    body.replaceChildren.apply(body, rows);
    $("d-attempts-empty").hidden = rows.length > 0;
    $("d-attempts").hidden = rows.length === 0;

    setText($("d-error"), visible(task.error, true));
    $("d-error-box").hidden = !task.error;
    let traceback = task.traceback;
    if (!traceback) {
      const failed = (task.attempts_detail || []).filter(function (a) { return a.traceback; });
      traceback = failed.length ? failed[failed.length - 1].traceback : null;
    }
    setText($("d-traceback"), visible(traceback, true));
    $("d-traceback-box").hidden = !traceback;

    const logs = task.logs || [];
    setText($("d-logs"), logs.map(function (line) {
      return (line.t ? fmtTime(line.t) + " " : "") + (line.level ? line.level + " " : "") +
        visible(line.message, true);
    }).join("\n"));
    $("d-logs").hidden = logs.length === 0;
    $("d-logs-empty").hidden = logs.length > 0;

    const metrics = Object.keys(task.custom_metrics || {}).sort();
    const mbody = $("d-metrics").tBodies[0];
    mbody.replaceChildren.apply(mbody, metrics.map(function (key) {
      const row = el("tr");
      row.append(el("td", "name", visible(key)),
                 el("td", "num", fmtNumber(task.custom_metrics[key], 3)));
      return row;
    }));
    $("d-metrics-box").hidden = metrics.length === 0;
  }

  // -- loads and breakers --------------------------------------------------------

  function renderLoads(doc) {
    const loads = doc.loads || [];
    const body = $("loads").tBodies[0];
    body.replaceChildren.apply(body, loads.map(function (load) {
      const row = el("tr");
      let model = "–";
      if (load.fixed_cost_ms !== undefined && load.fixed_cost_ms !== null) {
        model = fmtNumber(load.fixed_cost_ms, 2) + " ms + " + fmtNumber(load.per_row_us, 2) +
          " µs/row";
        if (load.target_latency_ms) {
          model += " (SLO " + fmtNumber(load.target_latency_ms, 0) + " ms)";
        }
      } else if (load.last_decision) {
        model = load.last_decision;
      }
      const dead = el("td", "num", fmtNumber(load.rows_dead_lettered, 0));
      dead.classList.toggle("bad", load.rows_dead_lettered > 0);
      row.append(el("td", "name", visible(load.task)), el("td", "num", fmtNumber(load.rows_written, 0)),
                 dead, el("td", "num", fmtNumber(load.rows_per_s, 0)),
                 el("td", "num", fmtNumber(load.batch_size, 0)), el("td", "model", model));
      row.addEventListener("click", function () { select(load.task); });
      return row;
    }));
    $("loads-empty").hidden = loads.length > 0;
    $("loads").hidden = loads.length === 0;
  }

  function renderBreakers(doc) {
    const names = Object.keys(doc.breakers || {}).sort();
    const body = $("breakers").tBodies[0];
    body.replaceChildren.apply(body, names.map(function (name) {
      const row = el("tr");
      const state = doc.breakers[name].state;
      row.append(el("td", "name", visible(name)), el("td", "num breaker breaker-" + state, state));
      return row;
    }));
    $("breakers-empty").hidden = names.length > 0;
    $("breakers").hidden = names.length === 0;
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
    timeline.update(doc);
    $("timeline-empty").hidden = (doc.attempts || []).length > 0;
    renderLoads(doc);
    renderBreakers(doc);
    // A stored run has no sampled history: the chart shows only for live runs.
    $("chart-panel").hidden = doc.source === "store";
    if (doc.source !== "store") {
      window.pipeoptChart(doc, $("chart"));
    }
  }

  async function poll() {
    let again = true;
    try {
      const response = await fetch(api, {
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
        if (selected !== null) {
          loadDetails();
        }
        // A stored run that is over never changes again: stop polling it.
        again = doc.source !== "store" || doc.status === "running";
        setConnection("live", again ? "live" : "stored");
      }
    } catch (err) {
      setConnection("error", "offline, retrying");
    }
    if (again) {
      window.setTimeout(poll, refreshMs);
    }
  }

  $("d-close").addEventListener("click", function () {
    selected = null;
    $("details").hidden = true;
    if (lastDoc) {
      renderTasks(lastDoc);
    }
  });
  $("search").addEventListener("input", function (event) {
    search = event.target.value;
    if (lastDoc) {
      renderTasks(lastDoc);
    }
  });
  window.addEventListener("resize", function () {
    if (lastDoc) {
      timeline.draw();
      if (lastDoc.source !== "store") {
        window.pipeoptChart(lastDoc, $("chart"));
      }
    }
  });
  if (api.indexOf("/api/runs/") === 0) {
    $("runs-link").hidden = false;
    $("data-link").href = api + window.location.search;
    $("prom-note").hidden = true;
  }
  if (selected !== null) {
    select(selected);
  }

  poll();
})();
