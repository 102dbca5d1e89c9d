// A tiny per-minute chart in SVG: bars for alerts and revocations, an optional line for
// events/s. No dependencies; every node is built with the DOM API (no innerHTML).
const SVG = "http://www.w3.org/2000/svg";

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// In the browser's zone, like every other time on the page (static/evidence.js).
function hhmm(epochSeconds) {
  const d = new Date(epochSeconds * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

/**
 * Draw `points` ([{minute, alerts, revocations, events?}], oldest first) into `host`.
 * Returns the drawn totals so the caller can label them.
 */
export function drawChart(host, points) {
  const width = 900;
  const height = 150;
  const pad = { left: 30, right: 8, top: 8, bottom: 20 };
  const innerW = width - pad.left - pad.right;
  const innerH = height - pad.top - pad.bottom;
  const max = Math.max(1, ...points.map((p) => Math.max(p.alerts, p.revocations)));
  const slot = innerW / Math.max(1, points.length);
  const barW = Math.max(1, slot / 2 - 1);
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", "aria-hidden": "true" });
  svg.append(el("line", { class: "axis", x1: pad.left, y1: pad.top + innerH, x2: width - pad.right, y2: pad.top + innerH }));
  svg.append(el("text", { class: "axis-label", x: 2, y: pad.top + 8 }, String(max)));
  svg.append(el("text", { class: "axis-label", x: 2, y: pad.top + innerH }, "0"));
  points.forEach((p, i) => {
    const x = pad.left + i * slot;
    const ha = (p.alerts / max) * innerH;
    const hr = (p.revocations / max) * innerH;
    if (p.alerts > 0) {
      const bar = el("rect", { class: "bar-alerts", x, y: pad.top + innerH - ha, width: barW, height: ha });
      bar.append(el("title", {}, `${hhmm(p.minute)}: ${p.alerts} alert(s)`));
      svg.append(bar);
    }
    if (p.revocations > 0) {
      const bar = el("rect", { class: "bar-revocations", x: x + barW + 1, y: pad.top + innerH - hr, width: barW, height: hr });
      bar.append(el("title", {}, `${hhmm(p.minute)}: ${p.revocations} revocation(s)`));
      svg.append(bar);
    }
    if (i % 5 === 0 || i === points.length - 1) {
      svg.append(el("text", { class: "axis-label", x, y: height - 4 }, hhmm(p.minute)));
    }
  });
  const withEvents = points.filter((p) => typeof p.events === "number");
  if (withEvents.length > 1) {
    const emax = Math.max(1, ...withEvents.map((p) => p.events));
    const path = points
      .map((p, i) => (typeof p.events === "number"
        ? `${i === 0 ? "M" : "L"}${pad.left + i * slot + slot / 2},${pad.top + innerH - (p.events / emax) * innerH}`
        : ""))
      .join(" ");
    svg.append(el("path", { class: "line-events", d: path }));
  }
  host.replaceChildren(svg);
  return {
    alerts: points.reduce((n, p) => n + p.alerts, 0),
    revocations: points.reduce((n, p) => n + p.revocations, 0),
    events: withEvents.length > 1,
  };
}
