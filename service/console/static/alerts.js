// The live alert feed: follows /console/alerts/stream (the session cookie authenticates
// it), adds rows as alerts arrive, applies the client-side filters, acknowledges through
// the CSRF-protected form without leaving the page, and keeps the chart current: one
// SSE alert event updates the table and the chart together (the timeline is re-read
// after the event only to pick up revocations, which are not on the alert stream).
// Every value from the server is set with textContent: nothing is parsed as HTML.
import { drawChart } from "./chart.js";
import { evidenceItems, fmtUtc, localise } from "./evidence.js";

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

const fmtTime = fmtUtc;

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

function evidencePanel(evidence) {
  const items = evidenceItems(evidence);
  if (!items.length) return node("span", { class: "hint", text: "—" });
  const dl = node("dl", { class: "facts" });
  for (const item of items) {
    const value = item.iso
      ? node("time", { datetime: item.iso, "data-local": "", text: item.value })
      : document.createTextNode(item.value);
    dl.append(node("dt", { text: item.label }), node("dd", item.iso ? {} : { class: "mono" }, value));
  }
  return node(
    "details",
    { class: "evidence" },
    node("summary", { text: `${items.length} fact${items.length === 1 ? "" : "s"}` }),
    dl,
  );
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
  const summary = typeof alert.evidence?.summary === "string" ? alert.evidence.summary : "";
  const text = `${alert.rule} ${alert.agent_id} ${alert.task_id || ""} ${alert.action} ${summary}`.toLowerCase();
  const tr = node("tr", {
    "data-alert-id": alert.alert_id,
    "data-seq": String(alert.seq),
    "data-severity": alert.severity,
    "data-text": text,
    "data-acked": alert.acked_at ? "yes" : "no",
  });
  if (alert.acked_at) tr.classList.add("acked");
  const when = node("time", { datetime: new Date(alert.at * 1000).toISOString(), "data-local": "", text: fmtTime(alert.at) });
  const rule = node("td", {}, node("code", { text: alert.rule }));
  if (alert.score !== null && alert.score !== undefined) {
    rule.append(node("br"), node("span", { class: "hint", text: `score ${Number(alert.score).toFixed(3)}` }));
  }
  const agent = node("a", { href: `/console/agents/${encodeURIComponent(alert.agent_id)}`, text: alert.agent_id });
  const task = alert.task_id
    ? node("a", { class: "mono", href: `/console/tasks/${encodeURIComponent(alert.task_id)}`, text: alert.task_id })
    : document.createTextNode("—");
  tr.append(
    node("td", {}, when),
    node("td", {}, badge("sev", alert.severity)),
    rule,
    node("td", {}, agent),
    node("td", {}, task),
    node("td", { class: "summary", text: summary || "—" }),
    node("td", {}, evidencePanel(alert.evidence || {})),
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

// The alert's own minute gets +1 now, in the same handler that adds its row; a minute
// past the window's end rolls the window forward (the chart keeps its width).
function countLive(alert) {
  if (!points.length) return;
  const minute = Math.floor(alert.at / 60) * 60;
  let last = points[points.length - 1];
  while (minute > last.minute) {
    points.push({ minute: last.minute + 60, alerts: 0, revocations: 0 });
    points.shift();
    last = points[points.length - 1];
  }
  const bucket = points.find((p) => p.minute === minute);
  if (bucket) bucket.alerts += 1;
  redraw();
}

let pendingRefresh = null;
function refreshSoon() {
  clearTimeout(pendingRefresh);
  pendingRefresh = setTimeout(refreshTimeline, 1_000);
}

refreshTimeline();
// Rolls the window on a quiet feed and picks up analysts' revocations.
setInterval(refreshTimeline, 30_000);

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
    localise(tr);
    document.querySelector("[data-empty]")?.remove();
    applyFilters();
    countLive(alert);
    refreshSoon();
  });
  source.addEventListener("ack", (event) => markAcked(JSON.parse(event.data)));
}

applyFilters();
if (feed.dataset.live === "yes") connect();
else {
  live.textContent = "range search: live updates off";
  live.className = "live off";
}
