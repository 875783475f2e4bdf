// pipeopt run timeline: one lane per worker slot, one bar per attempt, drawn on a canvas.
//
// Attempts arrive as compact rows [task index, attempt, start ms, duration ms | null,
// outcome]. Lanes are assigned here, greedily by start time (each attempt takes the
// lowest lane free at its start), which needs exactly as many lanes as attempts ever
// ran at once: the worker slots in use. A canvas keeps 10,000 bars cheap to draw; the
// hover and click targets are found by binary search in the lane under the pointer.
// Text drawn on the canvas is pixels, never markup; the tooltip uses textContent.
"use strict";

(function () {
  const COLOURS = {
    succeeded: "#16a34a",
    failed: "#dc2626",
    retried: "#f59e0b",
    running: "#2563eb",
  };
  const CRITICAL = "#7c3aed";
  const AXIS_HEIGHT = 22;
  const MAX_HEIGHT = 320;

  function fmtMs(ms) {
    if (ms < 1000) {
      return Math.round(ms) + " ms";
    }
    if (ms < 60000) {
      return (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";
    }
    return Math.floor(ms / 60000) + "m " + Math.round((ms % 60000) / 1000) + "s";
  }

  function assignLanes(bars) {
    // bars sorted by start; returns lane count.
    const laneEnd = [];
    for (const bar of bars) {
      let lane = 0;
      while (lane < laneEnd.length && laneEnd[lane] > bar.start + 1e-6) {
        lane++;
      }
      laneEnd[lane] = bar.end;
      bar.lane = lane;
    }
    return laneEnd.length;
  }

  function Timeline(canvas, tooltip, onPick) {
    this.canvas = canvas;
    this.tooltip = tooltip;
    this.onPick = onPick;
    this.bars = [];
    this.byLane = [];
    this.lanes = 0;
    this.span = 1;
    this.names = [];
    this.layout = null;
    const self = this;
    canvas.addEventListener("mousemove", function (event) {
      self.hover(event);
    });
    canvas.addEventListener("mouseleave", function () {
      tooltip.hidden = true;
    });
    canvas.addEventListener("click", function (event) {
      const bar = self.barAt(event);
      if (bar) {
        self.onPick(self.names[bar.task]);
      }
    });
  }

  Timeline.prototype.update = function (doc) {
    const rows = doc.attempts || [];
    const elapsed = (doc.elapsed_s || 0) * 1000;
    const critical = new Set(doc.critical_path || []);
    this.names = doc.tasks.map(function (t) { return t.name; });
    const bars = new Array(rows.length);
    let span = elapsed;
    for (let k = 0; k < rows.length; k++) {
      const row = rows[k];
      const start = row[2];
      const end = row[3] === null ? Math.max(start, elapsed) : start + row[3];
      bars[k] = {
        task: row[0], number: row[1], start: start, end: end, outcome: row[4],
        critical: critical.has(row[0]), lane: 0,
      };
      if (end > span) {
        span = end;
      }
    }
    bars.sort(function (a, b) { return a.start - b.start || a.task - b.task; });
    this.lanes = assignLanes(bars);
    this.byLane = [];
    for (let lane = 0; lane < this.lanes; lane++) {
      this.byLane.push([]);
    }
    for (const bar of bars) {
      this.byLane[bar.lane].push(bar);
    }
    this.bars = bars;
    this.span = Math.max(span, 1);
    this.draw();
  };

  Timeline.prototype.draw = function () {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(320, canvas.parentElement.clientWidth || 800);
    const lanes = Math.max(1, this.lanes);
    const laneHeight = Math.max(3, Math.min(18, Math.floor((MAX_HEIGHT - AXIS_HEIGHT) / lanes)));
    const height = lanes * laneHeight + AXIS_HEIGHT;
    canvas.style.width = width + "px";
    canvas.style.height = height + "px";
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 4;
    const plot = width - 2 * left;
    const scale = plot / this.span;
    this.layout = { left: left, scale: scale, laneHeight: laneHeight };
    const gap = laneHeight > 6 ? 2 : laneHeight > 3 ? 1 : 0;

    ctx.fillStyle = "rgba(128, 128, 128, 0.08)";
    for (let lane = 1; lane < lanes; lane += 2) {
      ctx.fillRect(0, lane * laneHeight, width, laneHeight);
    }
    // Bars, one fillRect each; at least a pixel wide so short attempts stay visible.
    for (const outcome of Object.keys(COLOURS)) {
      ctx.fillStyle = COLOURS[outcome];
      for (const bar of this.bars) {
        if (bar.outcome === outcome) {
          const x = left + bar.start * scale;
          const w = Math.max(1, (bar.end - bar.start) * scale);
          ctx.fillRect(x, bar.lane * laneHeight + gap / 2, w, laneHeight - gap);
        }
      }
    }
    // The critical path: an outline around its attempts.
    ctx.strokeStyle = CRITICAL;
    ctx.lineWidth = 2;
    let criticalBars = 0;
    for (const bar of this.bars) {
      if (bar.critical) {
        criticalBars++;
        const x = left + bar.start * scale;
        const w = Math.max(1, (bar.end - bar.start) * scale);
        ctx.strokeRect(x, bar.lane * laneHeight + 1, w, laneHeight - 2);
      }
    }
    // Parked waits: a dashed line from a retried attempt's end to the next attempt's start.
    const previous = new Map();
    const byTask = this.bars.slice().sort(function (a, b) {
      return a.task - b.task || a.number - b.number;
    });
    ctx.strokeStyle = COLOURS.retried;
    ctx.lineWidth = 1;
    ctx.setLineDash([3, 3]);
    let waits = 0;
    for (const bar of byTask) {
      const before = previous.get(bar.task);
      if (before && before.outcome === "retried") {
        waits++;
        ctx.beginPath();
        ctx.moveTo(left + before.end * scale, before.lane * laneHeight + laneHeight / 2);
        ctx.lineTo(left + bar.start * scale, bar.lane * laneHeight + laneHeight / 2);
        ctx.stroke();
      }
      previous.set(bar.task, bar);
    }
    ctx.setLineDash([]);
    // Time axis.
    const top = lanes * laneHeight;
    ctx.fillStyle = "#8d99ae";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "top";
    const ticks = 6;
    for (let k = 0; k <= ticks; k++) {
      const t = (this.span * k) / ticks;
      const x = left + t * scale;
      ctx.fillRect(x, top, 1, 4);
      ctx.textAlign = k === 0 ? "left" : k === ticks ? "right" : "center";
      ctx.fillText(fmtMs(t), x, top + 6);
    }
    canvas.dataset.bars = String(this.bars.length);
    canvas.dataset.lanes = String(this.lanes);
    canvas.dataset.critical = String(criticalBars);
    canvas.dataset.waits = String(waits);
    canvas.setAttribute(
      "aria-label",
      this.bars.length + " attempts on " + this.lanes + " worker lanes over " + fmtMs(this.span)
    );
  };

  Timeline.prototype.barAt = function (event) {
    if (!this.layout) {
      return null;
    }
    const rect = this.canvas.getBoundingClientRect();
    const x = event.clientX - rect.left;
    const y = event.clientY - rect.top;
    const lane = Math.floor(y / this.layout.laneHeight);
    const list = this.byLane[lane];
    if (!list || list.length === 0) {
      return null;
    }
    const t = (x - this.layout.left) / this.layout.scale;
    const slack = 3 / this.layout.scale; // a few pixels either side of thin bars
    let lo = 0;
    let hi = list.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (list[mid].start <= t + slack) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const bar = list[lo];
    return bar.start - slack <= t && t <= bar.end + slack ? bar : null;
  };

  Timeline.prototype.hover = function (event) {
    const bar = this.barAt(event);
    const tooltip = this.tooltip;
    if (!bar) {
      tooltip.hidden = true;
      this.canvas.style.cursor = "default";
      return;
    }
    this.canvas.style.cursor = "pointer";
    tooltip.textContent = window.pipeopt.visible(this.names[bar.task]) + " · attempt " + bar.number +
      " · " + bar.outcome + " · " + fmtMs(bar.end - bar.start) + " at +" + fmtMs(bar.start) +
      (bar.critical ? " · critical path" : "");
    tooltip.hidden = false;
    const rect = this.canvas.getBoundingClientRect();
    tooltip.style.left = Math.min(event.clientX - rect.left + 12, rect.width - 260) + "px";
    tooltip.style.top = event.clientY - rect.top + 14 + "px";
  };

  window.PipeoptTimeline = Timeline;
})();
