// pipeopt runs list (`pipeopt ui`): poll /api/runs and list the stored runs, newest first.
//
// Names, ids and parameters are written with textContent (control characters as
// symbols), never parsed as HTML. Links carry the page's ?token= query along.
"use strict";

(function () {
  const visible = window.pipeopt.visible;
  const el = window.pipeopt.el;
  const api = document.body.dataset.api || "/api/runs";
  const query = window.location.search;
  const token = new URLSearchParams(query).get("token");
  const headers = { Accept: "application/json" };
  if (token) {
    headers.Authorization = "Bearer " + token;
  }
  let refreshMs = 2000;
  let search = "";
  let lastDoc = null;

  function $(id) {
    return document.getElementById(id);
  }

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) {
      return "–";
    }
    if (seconds < 60) {
      return seconds.toFixed(seconds < 10 ? 2 : 1) + " s";
    }
    const minutes = Math.floor(seconds / 60);
    return minutes < 60 ? minutes + "m " + Math.floor(seconds % 60) + "s"
      : Math.floor(minutes / 60) + "h " + (minutes % 60) + "m";
  }

  function outcome(run) {
    const parts = [];
    for (const state of ["succeeded", "failed", "skipped", "cancelled", "cached"]) {
      if (run.counts[state]) {
        parts.push(run.counts[state] + " " + state);
      }
    }
    return parts.join(", ") || "–";
  }

  function parameters(run) {
    if (!run.parameters) {
      return "–";
    }
    return Object.keys(run.parameters).sort().map(function (key) {
      return key + "=" + JSON.stringify(run.parameters[key]);
    }).join(" ");
  }

  function render(doc) {
    lastDoc = doc;
    const needle = search.toLowerCase();
    const runs = doc.runs.filter(function (run) {
      return !needle || (run.pipeline + " " + run.run_id + " " + run.status)
        .toLowerCase().indexOf(needle) >= 0;
    });
    const body = $("runs").tBodies[0];
    body.replaceChildren.apply(body, runs.map(function (run) {
      const row = el("tr", "run-row row-" + run.status);
      const link = el("a", "run-link", visible(run.run_id));
      link.href = "/runs/" + encodeURIComponent(run.run_id) + query;
      const runCell = el("td", "name");
      runCell.append(link);
      const status = el("td");
      status.append(el("span", "badge state-" + run.status, run.status));
      row.append(status, el("td", "name", visible(run.pipeline)), runCell,
                 el("td", null, new Date(run.started_at).toLocaleString()),
                 el("td", "num", fmtDuration(run.duration_s)), el("td", "num", run.tasks),
                 el("td", null, outcome(run)), el("td", "name", visible(parameters(run))));
      row.addEventListener("click", function (event) {
        if (event.target !== link) {
          window.location.href = link.href;
        }
      });
      return row;
    }));
    $("runs-empty").hidden = doc.runs.length > 0;
    $("shown").textContent = runs.length + " of " + doc.runs.length + " runs";
    const updated = $("last-update");
    updated.setAttribute("datetime", doc.last_update);
    updated.textContent = new Date(doc.last_update).toLocaleTimeString();
  }

  async function poll() {
    const conn = $("conn");
    try {
      const response = await fetch(api, { headers: headers, cache: "no-store", credentials: "same-origin" });
      if (response.ok) {
        const doc = await response.json();
        if (typeof doc.refresh_interval === "number" && doc.refresh_interval > 0) {
          refreshMs = Math.max(500, doc.refresh_interval * 1000);
        }
        render(doc);
        conn.className = "conn conn-live";
        conn.textContent = "live";
      } else {
        conn.className = "conn conn-error";
        conn.textContent = response.status === 401 ? "token required" : "error " + response.status;
      }
    } catch (err) {
      conn.className = "conn conn-error";
      conn.textContent = "offline, retrying";
    }
    window.setTimeout(poll, refreshMs);
  }

  $("search").addEventListener("input", function (event) {
    search = event.target.value;
    if (lastDoc) {
      render(lastDoc);
    }
  });
  poll();
})();
