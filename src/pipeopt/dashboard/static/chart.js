// pipeopt throughput and latency chart: an inline SVG built with DOM calls (no markup parsing).
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";

  function fmtNumber(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) {
      return "–";
    }
    return Number(value).toLocaleString(undefined, {
      maximumFractionDigits: digits,
      minimumFractionDigits: 0,
    });
  }


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

  function renderChart(doc, chart) {
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

  window.pipeoptChart = renderChart;
})();
