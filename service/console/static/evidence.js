// Evidence as facts, and times in the reader's own zone. The labels and the time rule are
// the server's (service/console/render.py, evidence_items): keep the two in step, so a
// row that arrived live reads exactly like one the server rendered.
export const LABELS = {
  event_at: "offending use at",
  event_id: "usage event",
  jti_hash: "credential (SHA-256 of jti)",
  revocation: "revocation outcome",
  revocation_id: "revocation id",
  max_rate: "allowed rate (calls/s)",
  max_calls: "allowed calls",
  bytes_out: "bytes sent",
  bytes_in: "bytes received",
  user_agent: "user agent",
};
const TIME_KEYS = new Set(["at", "since", "until", "window_start", "window_end"]);

export function fmtUtc(epochSeconds) {
  return new Date(epochSeconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
}

// The same spelling as the server's (sorted keys, ", " and ": ").
export function compactJson(value) {
  if (Array.isArray(value)) return `[${value.map(compactJson).join(", ")}]`;
  if (value && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}: ${compactJson(value[k])}`).join(", ")}}`;
  }
  return JSON.stringify(value ?? null);
}

function isTime(key, value) {
  return (TIME_KEYS.has(key) || key.endsWith("_at")) && typeof value === "number" && value >= 1e9 && value < 1e10;
}

/** [{label, value, iso}] for every evidence key but the summary, sorted by key. */
export function evidenceItems(evidence) {
  return Object.keys(evidence || {})
    .filter((k) => k !== "summary")
    .sort()
    .map((key) => {
      const value = evidence[key];
      const label = LABELS[key] ?? key.replaceAll("_", " ").trim();
      if (isTime(key, value)) return { label, value: fmtUtc(value), iso: new Date(value * 1000).toISOString() };
      return { label, value: typeof value === "string" ? value : compactJson(value), iso: "" };
    });
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/**
 * "2026-12-02 15:04:05 UTC+1" in the browser's zone. The time and zone are joined by
 * no-break spaces, so a narrow cell wraps only between the date and the time.
 */
export function localTime(date) {
  const off = -date.getTimezoneOffset();
  const hours = Math.floor(Math.abs(off) / 60);
  const minutes = Math.abs(off) % 60;
  const zone = off === 0 ? "UTC" : `UTC${off > 0 ? "+" : "-"}${hours}${minutes ? `:${pad(minutes)}` : ""}`;
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}\u00a0${zone}`;
}

export function localise(root) {
  for (const el of root.querySelectorAll("time[datetime][data-local]")) {
    if (el.dataset.localised) continue;
    const date = new Date(el.getAttribute("datetime"));
    if (Number.isNaN(date.getTime())) continue;
    el.title = `${el.textContent} (UTC)`;
    el.textContent = localTime(date);
    el.dataset.localised = "yes";
  }
}
