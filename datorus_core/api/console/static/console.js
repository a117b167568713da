// The Datorus console's only script (served from /console/static: the CSP allows no inline code).
// It draws the usage chart (uPlot, vendored), refreshes the balance, and asks before revoking.
"use strict";

function usageChart() {
  const data = document.getElementById("usage-data");
  const box = document.getElementById("usage-chart");
  if (!data || !box || typeof uPlot === "undefined") return;
  const d = JSON.parse(data.textContent);
  if (!d.days.length) {
    box.textContent = "No usage yet: the chart fills in as you use the proxy.";
    box.classList.add("muted");
    return;
  }
  const xs = d.days.map((day) => Date.parse(day + "T00:00:00Z") / 1000);
  const mb = d.bytes.map((b) => b / 1e6);
  const opts = {
    width: box.clientWidth || 300,
    height: 200,
    scales: { x: { time: true } },
    axes: [{}, { label: "MB", size: 60 }],
    legend: { show: true },
    series: [
      {},
      {
        label: "MB",
        stroke: "#1f5fbf",
        fill: "rgba(31,95,191,0.25)",
        paths: uPlot.paths.bars({ size: [0.6, 40] }),
        points: { show: false },
        value: (u, v) => (v == null ? "-" : v.toFixed(3) + " MB"),
      },
    ],
  };
  const plot = new uPlot(opts, [xs, mb], box);
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
