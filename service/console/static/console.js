// Every page: show server-rendered times in the reader's zone (the UTC text stays as the
// tooltip), and let the time-range search take local times too: the server reads the
// form's times as UTC, so they are converted here, both ways. Without JavaScript every
// time on the page, and in the form, is UTC, as the labels say.
import { localise } from "./evidence.js";

localise(document);

function pad(n) {
  return String(n).padStart(2, "0");
}

// A Date as a datetime-local value, in the browser's zone.
function asLocalInput(date) {
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

for (const form of document.querySelectorAll("form.range")) {
  const inputs = [...form.querySelectorAll('input[type="datetime-local"]')];
  for (const input of inputs) {
    if (input.value) {
      const utc = new Date(`${input.value}Z`);
      if (!Number.isNaN(utc.getTime())) input.value = asLocalInput(utc);
    }
    const hint = form.querySelector(`label[for="${input.id}"] .hint`);
    if (hint) hint.textContent = "(local time)";
  }
  form.addEventListener("submit", () => {
    for (const input of inputs) {
      if (!input.value) continue;
      const local = new Date(input.value); // no offset: read in the browser's zone
      if (!Number.isNaN(local.getTime())) input.value = local.toISOString().slice(0, 19);
    }
  });
}
