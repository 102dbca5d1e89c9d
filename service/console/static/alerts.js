// The live alert feed: follows /console/alerts/stream (the session cookie authenticates
// it), adds rows as alerts arrive, applies the client-side filters, acknowledges through
// the CSRF-protected form without leaving the page, and keeps the chart current.
// Every value from the server is set with textContent: nothing is parsed as HTML.
import { drawChart } from "./chart.js";

const SEVERITY_RANK = { low: 0, medium: 1, high: 2, critical: 3 };
const feed = document.getElementById("feed");
const table = document.getElementById("alerts");
const tbody = table.tBodies[0];
const live = document.getElementById("live");
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const canAck = feed.dataset.canAck === "yes";
const filters = document.getElementById("filters");
const countLabel = document.getElementById("f-count");

// ------------------------------------------------------------------ rendering

function fmtTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

function node(tag, attrs = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") n.className = v;
    else if (k === "text") n.textContent = v;
    else n.setAttribute(k, v);
  }
  n.append(...children);
  return n;
}

function badge(kind, value) {
  return node("span", { class: `badge ${kind}-${value}`, text: value });
}

// The same spelling as the server's (sorted keys, ", " and ": "), so live and rendered rows match.
function compactJson(value) {
  if (Array.isArray(value)) return `[${value.map(compactJson).join(", ")}]`;
  if (value && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}: ${compactJson(value[k])}`).join(", ")}}`;
  }
  return JSON.stringify(value ?? null);
}

function ackCell(alert) {
  if (alert.acked_at) {
    const by = alert.acked_by ? ` by ${alert.acked_by}` : "";
    return node("td", {}, node("span", { class: "hint", text: `acked ${fmtTime(alert.acked_at)}${by}` }));
  }
  if (!canAck) return node("td", {}, node("span", { class: "hint", text: "open" }));
  const form = node(
    "form",
    { class: "inline ack-form", method: "post", action: `/console/alerts/${encodeURIComponent(alert.alert_id)}/ack` },
    node("input", { type: "hidden", name: "csrf_token", value: csrf }),
    node("button", { class: "small", type: "submit", text: "Acknowledge" }),
  );
  return node("td", {}, form);
}

function alertRow(alert) {
  const text = `${alert.rule} ${alert.agent_id} ${alert.task_id || ""} ${alert.action}`.toLowerCase();
  const tr = node("tr", {
    "data-alert-id": alert.alert_id,
    "data-seq": String(alert.seq),
    "data-severity": alert.severity,
    "data-text": text,
    "data-acked": alert.acked_at ? "yes" : "no",
  });
  if (alert.acked_at) tr.classList.add("acked");
  const when = node("time", { datetime: new Date(alert.at * 1000).toISOString(), text: fmtTime(alert.at) });
  const rule = node("td", {}, node("code", { text: alert.rule }));
  if (alert.score !== null && alert.score !== undefined) {
    rule.append(node("br"), node("span", { class: "hint", text: `score ${Number(alert.score).toFixed(3)}` }));
  }
  const agent = node("a", { href: `/console/agents/${encodeURIComponent(alert.agent_id)}`, text: alert.agent_id });
  const task = alert.task_id
    ? node("a", { class: "mono", href: `/console/tasks/${encodeURIComponent(alert.task_id)}`, text: alert.task_id })
    : document.createTextNode("—");
  const evidence = node("div", {
    class: "evidence mono",
    text: compactJson(alert.evidence || {}),
  });
  tr.append(
    node("td", {}, when),
    node("td", {}, badge("sev", alert.severity)),
    rule,
    node("td", {}, agent),
    node("td", {}, task),
    node("td", {}, evidence),
    node("td", {}, badge("act", alert.action)),
    ackCell(alert),
  );
  return tr;
}

// ------------------------------------------------------------------ filters

function applyFilters() {
  const minRank = SEVERITY_RANK[filters.elements.severity.value] ?? 0;
  const needle = filters.elements.text.value.trim().toLowerCase();
  const openOnly = filters.elements.open.checked;
  let shown = 0;
  for (const tr of tbody.rows) {
    const ok =
      (SEVERITY_RANK[tr.dataset.severity] ?? 0) >= minRank &&
      (!needle || tr.dataset.text.includes(needle)) &&
      (!openOnly || tr.dataset.acked !== "yes");
    tr.hidden = !ok;
    if (ok) shown += 1;
  }
  countLabel.textContent = `${shown} of ${tbody.rows.length} shown`;
}

filters.addEventListener("input", applyFilters);
filters.addEventListener("submit", (e) => e.preventDefault());

// ------------------------------------------------------------------ acknowledging

tbody.addEventListener("submit", async (event) => {
  const form = event.target.closest("form.ack-form");
  if (!form) return;
  event.preventDefault();
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const response = await fetch(form.action, {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
      headers: { "X-Console-Fetch": "1" },
      credentials: "same-origin",
    });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    markAcked(await response.json());
  } catch (err) {
    button.disabled = false;
    button.textContent = "Retry acknowledge";
    button.title = String(err);
  }
});

function markAcked(alert) {
  const tr = tbody.querySelector(`tr[data-alert-id="${CSS.escape(alert.alert_id)}"]`);
  if (!tr) return;
  tr.dataset.acked = "yes";
  tr.classList.add("acked");
  tr.lastElementChild.replaceWith(ackCell(alert));
  applyFilters();
}

// ------------------------------------------------------------------ chart

const chartHost = document.getElementById("chart");
const chartPanel = document.getElementById("chart-panel");
const totals = document.getElementById("chart-totals");
let points = [];

function redraw() {
  const drawn = drawChart(chartHost, points);
  totals.textContent = `${drawn.alerts} alert(s), ${drawn.revocations} revocation(s) in the window`;
  document.getElementById("events-legend").hidden = !drawn.events;
}

async function refreshTimeline() {
  try {
    const response = await fetch(chartPanel.dataset.timeline, { credentials: "same-origin" });
    if (response.ok) {
      points = await response.json();
      redraw();
    }
  } catch {
    /* the next refresh retries */
  }
}

function countLive(alert) {
  const last = points[points.length - 1];
  if (last && alert.at >= last.minute && alert.at < last.minute + 60) {
    last.alerts += 1;
    redraw();
  }
}

refreshTimeline();
setInterval(refreshTimeline, 10_000);

// ------------------------------------------------------------------ the stream

function connect() {
  const url = `${feed.dataset.stream}?after=${encodeURIComponent(feed.dataset.after || "0")}`;
  const source = new EventSource(url);
  source.addEventListener("open", () => {
    live.textContent = "live";
    live.className = "live on";
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself (sending Last-Event-ID) unless the server refused.
    live.textContent = source.readyState === EventSource.CLOSED ? "disconnected — reload to sign in again" : "reconnecting…";
    live.className = "live off";
  });
  source.addEventListener("alert", (event) => {
    const alert = JSON.parse(event.data);
    if (tbody.querySelector(`tr[data-alert-id="${CSS.escape(alert.alert_id)}"]`)) return;
    feed.dataset.after = String(alert.seq);
    const tr = alertRow(alert);
    tr.classList.add("fresh");
    tbody.prepend(tr);
    document.querySelector("[data-empty]")?.remove();
    applyFilters();
    countLive(alert);
  });
  source.addEventListener("ack", (event) => markAcked(JSON.parse(event.data)));
}

applyFilters();
connect();
