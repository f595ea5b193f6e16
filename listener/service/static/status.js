// The status page's live updates: server-sent views of the daemon, put into the tables as
// text only (textContent, never innerHTML), plus the buttons' requests.
"use strict";

const CLASSES = new Set(["ok", "bad", "warn", "muted", "mono"]);
const ACTIONS = new Set(["timeline", "replay", "pause", "resume", "enable"]);
const csrf = document.querySelector('meta[name="csrf"]').content;

function cell(value) {
  const td = document.createElement("td");
  const data = typeof value === "string" ? { t: value } : value;
  if (CLASSES.has(data.c)) td.className = data.c;
  if (ACTIONS.has(data.a)) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.action = data.a;
    if (data.dest !== undefined) button.dataset.destination = data.dest;
    if (data.msg !== undefined) button.dataset.msg = data.msg;
    button.textContent = data.t;
    td.appendChild(button);
  } else {
    td.textContent = data.t === undefined ? "" : data.t;
  }
  return td;
}

function fill(name, rows) {
  const body = document.getElementById("t-" + name);
  if (!body) return;
  const fresh = document.createElement("tbody");
  fresh.id = body.id;
  for (const row of rows) {
    const tr = document.createElement("tr");
    for (const value of row) tr.appendChild(cell(value));
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
  if (name === "events") applyFilter();
}

function applyFilter() {
  const query = document.getElementById("filter").value.trim().toLowerCase();
  for (const tr of document.getElementById("t-events").rows) {
    const name = tr.cells[1].textContent.toLowerCase();
    const call = tr.cells[2].textContent.toLowerCase();
    const shown = !query || name.includes(query) || call.includes(query) ||
      (call.length >= 8 && query.startsWith(call));
    tr.hidden = !shown;
  }
}

function show(view) {
  for (const [name, rows] of Object.entries(view.tables)) fill(name, rows);
  const headline = document.getElementById("headline");
  headline.textContent = view.headline.t;
  headline.className = CLASSES.has(view.headline.c) ? view.headline.c : "";
  document.getElementById("updated").textContent = view.updated;
  document.getElementById("open-calls").textContent = view.open_calls;
}

function notice(text, bad) {
  const element = document.getElementById("notice");
  element.textContent = text;
  element.className = bad ? "bad" : "ok";
}

async function timeline(msgId) {
  const response = await fetch("/api/attempts?msg_id=" + encodeURIComponent(msgId));
  if (!response.ok) {
    notice("attempts of " + msgId + ": HTTP " + response.status, true);
    return;
  }
  const data = await response.json();
  document.getElementById("timeline-id").textContent = msgId;
  fill("timeline", data.attempts.map((a) => [
    a.time, a.destination, a.status === null ? "-" : String(a.status), a.took,
    a.error_class || "delivered", a.error || "-", a.probe ? "yes" : "",
  ]));
  document.getElementById("timeline-where").textContent = data.whereabouts.join("; ");
  document.getElementById("timeline").hidden = false;
}

async function act(body) {
  const response = await fetch("/api/action", {
    method: "POST",
    headers: { "content-type": "application/json", "x-csrf-token": csrf },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = {};
  try {
    data = await response.json();
  } catch (error) {
    data = { message: "HTTP " + response.status };
  }
  notice(data.message || "HTTP " + response.status, !response.ok);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const { action, destination, msg } = button.dataset;
  if (action === "timeline") {
    timeline(msg);
  } else {
    act({ action, destination, msg_id: msg });
  }
});

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("filter").addEventListener("input", applyFilter);
  const form = document.getElementById("replay-filter");
  if (form) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      act({
        action: "replay",
        destination: form.elements.destination.value,
        since_minutes: Number(form.elements.minutes.value),
      });
    });
  }
  const live = document.getElementById("live");
  const source = new EventSource("/events");
  source.onopen = () => { live.textContent = "(live)"; };
  source.onerror = () => { live.textContent = "(reconnecting)"; };
  source.onmessage = (message) => { show(JSON.parse(message.data)); };
});
