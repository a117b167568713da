// The Datorus console's only script (served from /console/static: the CSP allows no inline code).
// It draws the usage chart (uPlot, vendored), refreshes the balance, and asks before revoking.
"use strict";

function usageChart() {
  const data = document.getElementById("usage-data");
  const box = document.getElementById("usage-chart");
  if (!data || !box || typeof uPlot === "undefined") return;
  const d = JSON.parse(data.textContent);
  if (d.empty) {
    box.textContent = "No usage yet: the chart fills in as you use the proxy.";
    box.classList.add("muted");
    return;
  }
  // one unit for the whole chart, the largest that keeps the biggest day at 1 or more
  const top = Math.max(...d.bytes);
  const [unit, scale] = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3], ["B", 1]].find(
    ([, s]) => top >= s
  ) || ["B", 1];
  const xs = d.days.map((day) => Date.parse(day + "T00:00:00Z") / 1000);
  const ys = d.bytes.map((b) => b / scale);
  const opts = {
    width: box.clientWidth || 300,
    height: 200,
    scales: { x: { time: true, range: (u, lo, hi) => [lo - 43200, hi + 43200] } },
    axes: [{}, { label: unit, size: 60 }],
    legend: { show: true },
    series: [
      { value: (u, v) => (v == null ? "-" : new Date(v * 1000).toISOString().slice(0, 10)) },
      {
        label: unit,
        stroke: "#1f5fbf",
        fill: "rgba(31,95,191,0.25)",
        paths: uPlot.paths.bars({ size: [0.7, 40] }),
        points: { show: false },
        value: (u, v) => (v == null ? "-" : v.toFixed(2) + " " + unit),
      },
    ],
  };
  const plot = new uPlot(opts, [xs, ys], box);
  window.addEventListener("resize", () => plot.setSize({ width: box.clientWidth || 300, height: 200 }));
}

function liveNumbers() {
  const cells = document.querySelectorAll("[data-live]");
  if (!cells.length) return;
  const refresh = async () => {
    try {
      const r = await fetch("/console/live", { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) return;
      const v = await r.json();
      cells.forEach((c) => {
        const key = c.getAttribute("data-live");
        if (key in v) c.textContent = v[key];
      });
    } catch (e) {
      /* offline for a moment: the next round tries again */
    }
  };
  setInterval(refresh, 15000);
}

function confirmations() {
  document.querySelectorAll("form[data-confirm]").forEach((f) => {
    f.addEventListener("submit", (ev) => {
      if (!window.confirm(f.getAttribute("data-confirm"))) ev.preventDefault();
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  usageChart();
  liveNumbers();
  confirmations();
});
