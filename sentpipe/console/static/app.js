// sentpipe console: plain JavaScript, no dependencies. Every value that comes from an event is put into the
// page as text (text nodes, textContent); nothing from the server is ever parsed as HTML.
"use strict";

const state = { csrf: null, info: null, cleanup: [] };

// --- DOM helpers -------------------------------------------------------------------------------------------
// Control characters shown as escapes, as the CLI shows them: bidi controls reorder what is displayed (a
// status "\u202edereviled" read "delivered"), the others hide, and so do invisible format characters (two ids
// differing by a zero-width space looked the same; the joiners stay). Tabs and line breaks stay.
const UNSAFE = /[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b\u200e\u200f\u2028-\u202e\u2060-\u2069\ufeff]/g;
function visible(text) {
  return text.replace(UNSAFE, (ch) => {
    const code = ch.charCodeAt(0);
    return code < 0x100 ? "\\x" + code.toString(16).padStart(2, "0") : "\\u" + code.toString(16).padStart(4, "0");
  });
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(visible(String(c))));
  }
  return node;
}

const svgNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return append(node, children);
}

function when(ms) {
  if (ms === null || ms === undefined || ms === "") return "-";
  const d = new Date(typeof ms === "number" ? ms : String(ms));
  if (isNaN(d.getTime())) return String(ms);
  return d.toISOString().replace("T", " ").replace("Z", "");
}

function cell(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function eventLink(id) {
  if (!id) return "-";
  return el("a", { href: "#/event/" + encodeURIComponent(id), class: "mono" }, id);
}

function table(headers, rows, attrs) {
  return el(
    "table",
    attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows)
  );
}

function kv(pairs) {
  return el("table", { class: "kv" }, el("tbody", {}, pairs.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
}

function copyButton(getText, label) {
  return el(
    "button",
    {
      type: "button",
      class: "copy",
      onclick: async (e) => {
        const btn = e.currentTarget;
        const text = getText();
        try {
          await navigator.clipboard.writeText(text);
        } catch (_) {
          const area = el("textarea", { class: "offscreen" });
          area.value = text;
          document.body.append(area);
          area.select();
          document.execCommand("copy");
          area.remove();
        }
        btn.textContent = "Copied";
        setTimeout(() => (btn.textContent = label || "Copy"), 1200);
      },
    },
    label || "Copy"
  );
}

function bodyBlock(body) {
  const text = body.pretty !== null && body.pretty !== undefined ? body.pretty : body.text;
  return el(
    "div",
    { class: "body" },
    el("div", { class: "bar" }, el("span", { class: "muted" }, `${body.bytes} bytes` + (body.pretty ? ", JSON" : "")), copyButton(() => text, "Copy body")),
    el("pre", {}, text)
  );
}

function headersTable(headers) {
  return table(["header", "value"], headers.map(([k, v]) => el("tr", {}, el("td", { class: "mono" }, k), el("td", { class: "mono" }, v))), { class: "headers" });
}

function errorBox(message) {
  return el("p", { class: "error", role: "alert" }, message);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function isoFromLocal(value) {
  // <input type=datetime-local> gives local time without a zone; the API wants ISO-8601 with one.
  if (!value) return null;
  const d = new Date(value);
  return isNaN(d.getTime()) ? value : d.toISOString();
}

function commaList(value) {
  return value.split(",").map((s) => s.trim()).filter(Boolean);
}

// --- API ---------------------------------------------------------------------------------------------------
async function api(path, opts) {
  opts = opts || {};
  const headers = Object.assign({}, opts.headers || {});
  if (opts.method === "POST") {
    headers["X-CSRF-Token"] = state.csrf;
    headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, Object.assign({ credentials: "same-origin" }, opts, { headers }));
  if (res.status === 401) {
    location.href = "/login";
    throw new Error("sign in first");
  }
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error((data && data.error) || `HTTP ${res.status}`);
  return data;
}

function post(path, body) {
  return api(path, { method: "POST", body: JSON.stringify(body) });
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, v);
  return q.toString();
}

// A replay or redrive: start it, poll its progress into `progress`, return its result. `stop`, a button,
// shows while it runs: it asks the console to stop the job after the record in hand.
async function runJob(path, body, progress, stop) {
  let job = await post(path, body);
  const jobPath = "/api/jobs/" + encodeURIComponent(job.id);
  stop.textContent = "Stop";
  stop.disabled = false;
  stop.hidden = false;
  stop.onclick = async () => {
    stop.disabled = true;
    stop.textContent = "Stopping…";
    // A job that ended meanwhile answers 409: the next poll shows how it ended.
    await post(jobPath + "/stop", {}).catch(() => null);
  };
  try {
    for (;;) {
      progress.hidden = false;
      if (job.total) {
        progress.max = job.total;
        progress.value = job.done;
      } else progress.removeAttribute("value");
      progress.title = `${job.done} of ${job.total === null ? "?" : job.total}`;
      if (job.state !== "running") break;
      await sleep(250);
      job = await api(jobPath);
    }
  } finally {
    stop.hidden = true;
    stop.onclick = null;
  }
  if (job.state === "stopped") {
    const err = new Error(job.error || "stopped");
    err.stopped = true;
    throw err;
  }
  if (job.state === "failed") throw new Error(job.error || "failed");
  return job.result;
}

// How a job that did not finish ended: stopped on request (how far it got, how to go on), or failed.
function jobEnd(err) {
  return err.stopped ? el("p", { class: "warn", role: "status" }, "Stopped: " + err.message) : errorBox(err.message);
}

function resultView(result, sentLabel, columns) {
  const dry = result.dry_run;
  const rows = [
    ["run", result.run_id],
    ["read", result.read],
    [dry ? `would be ${sentLabel}` : sentLabel, result.sent],
    ["skipped by filter", result.skipped],
    [dry ? "would fail" : "failed", result.failed],
  ];
  if (result.already_redriven) rows.splice(4, 0, ["already taken by an earlier redrive", result.already_redriven]);
  if (result.past_retention) rows.splice(4, 0, ["past retention (deleted before it was read)", result.past_retention]);
  for (const [reason, n] of Object.entries(result.failures)) rows.push(["  " + reason, n]);
  const kept = Object.entries(result.kept || {});
  if (kept.length) {
    rows.push(["cannot be redriven (left in the DLQ)", kept.reduce((sum, [, n]) => sum + n, 0)]);
    for (const [reason, n] of kept) rows.push(["  " + reason, n]);
  }
  const unrecorded = Object.values(result.unrecorded || {}).reduce((sum, n) => sum + n, 0);
  if (unrecorded) rows.push(["sent, not in the ledger (the next redrive sends them again)", unrecorded]);
  const parts = [el("h3", {}, dry ? "Dry run: nothing was sent" : "Outcome"), el("div", { class: "result", "data-sent": result.sent }, kv(rows))];
  if (result.selected.length) {
    parts.push(table([...columns, "records"], result.selected.map(([a, b, n]) => el("tr", {}, el("td", {}, a), el("td", {}, b), el("td", {}, n)))));
  }
  if (result.start_past_retention && result.start_past_retention.length) {
    parts.push(el("p", { class: "warn" }, "The window starts before the oldest record retention kept in partition(s) " + result.start_past_retention.join(", ") + ": records of it may be gone (older ones are deleted)."));
  }
  if (result.missing_ids && result.missing_ids.length) parts.push(el("p", { class: "warn" }, "Not found in the window: " + result.missing_ids.join(", ")));
  return el("div", { class: "card" }, parts);
}

// --- charts (SVG) ------------------------------------------------------------------------------------------
const COLORS = ["#2f6fde", "#e07b39", "#3aa876", "#c64b8c", "#8a63d2", "#b8a12b", "#3db5c9", "#d9534f"];

function swatch(color) {
  const node = el("span", { class: "swatch" });
  node.style.backgroundColor = color; // through the CSSOM: the CSP allows no inline style attributes
  return node;
}

function barChart(title, minutes, series) {
  const names = Object.keys(series).sort();
  const W = 600, H = 140, bw = W / minutes.length;
  const totals = minutes.map((_, i) => names.reduce((s, n) => s + (series[n][i] || 0), 0));
  const max = Math.max(1, ...totals);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H + 16}`, class: "chart", role: "img" });
  chart.append(svg("title", {}, title));
  names.forEach((name, k) => {
    minutes.forEach((_, i) => {
      const below = names.slice(0, k).reduce((s, n) => s + (series[n][i] || 0), 0);
      const v = series[name][i] || 0;
      if (!v) return;
      const h = (v / max) * H, y = H - (below / max) * H - h;
      const rect = svg("rect", { x: i * bw + 1, y, width: bw - 2, height: h, fill: COLORS[k % COLORS.length] });
      rect.append(svg("title", {}, `${when(minutes[i])}  ${name}: ${v}`));
      chart.append(rect);
    });
  });
  chart.append(svg("text", { x: 0, y: H + 13, class: "axis" }, when(minutes[0]).slice(11, 16)));
  chart.append(svg("text", { x: W, y: H + 13, class: "axis", "text-anchor": "end" }, "now"));
  chart.append(svg("text", { x: 2, y: 10, class: "axis" }, `max ${max}/min`));
  const legend = el("ul", { class: "legend" }, names.map((n, k) => el("li", {}, swatch(COLORS[k % COLORS.length]), n)));
  return el("figure", { class: "card" }, el("figcaption", {}, title), chart, names.length ? legend : el("p", { class: "muted" }, "nothing in the last hour"));
}

function lineChart(title, series) {
  const names = Object.keys(series).sort();
  const W = 600, H = 140;
  const points = names.flatMap((n) => series[n]);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H + 16}`, class: "chart", role: "img" });
  chart.append(svg("title", {}, title));
  if (points.length) {
    const t0 = Math.min(...points.map((p) => p[0])), t1 = Math.max(...points.map((p) => p[0]), t0 + 1);
    const max = Math.max(1, ...points.map((p) => p[1]));
    names.forEach((name, k) => {
      const d = series[name].map(([t, v], i) => `${i ? "L" : "M"}${((t - t0) / (t1 - t0)) * W},${H - (v / max) * H}`).join(" ");
      chart.append(svg("path", { d, fill: "none", stroke: COLORS[k % COLORS.length], "stroke-width": 2 }));
    });
    chart.append(svg("text", { x: 2, y: 10, class: "axis" }, `max ${max}`));
    chart.append(svg("text", { x: 0, y: H + 13, class: "axis" }, when(t0).slice(11, 16)));
  }
  const legend = el("ul", { class: "legend" }, names.map((n, k) => el("li", {}, swatch(COLORS[k % COLORS.length]), n)));
  return el("figure", { class: "card" }, el("figcaption", {}, title), chart, points.length ? legend : el("p", { class: "muted" }, "no samples yet"));
}

// --- views -------------------------------------------------------------------------------------------------
async function overviewView(main) {
  main.append(el("h1", {}, "Overview"));
  const box = el("div", { id: "overview" });
  // A refresh that failed left the last numbers up with nothing saying they had stopped moving: a console
  // gone away (or its session expired) looked like a quiet pipeline.
  const stale = el("p", { id: "overview-stale", class: "error", role: "alert", hidden: true });
  main.append(stale, box);
  let shownAt = new Date();
  async function refresh() {
    const o = await api("/api/overview");
    const t = o.totals;
    const groups = t.consumer_lag ? Object.entries(t.consumer_lag) : [];
    const lag = groups.length ? groups.reduce((s, [, n]) => s + n, 0) : "-";
    const lagBy = groups.map(([g, n]) => `${g}: ${n}`).join(", ");
    const cards = el(
      "div",
      { class: "totals" },
      [
        ["events in, last whole minute", t.events_in_last_minute],
        ["events in, last hour", t.events_in_last_hour],
        ["dead letters, last hour", t.dead_letters_last_hour],
        ["duplicates dropped (worker total)", t.duplicates_dropped_total === null || t.duplicates_dropped_total === undefined ? "-" : t.duplicates_dropped_total],
        ["consumer lag" + (lagBy ? ` (${lagBy})` : ""), lag],
        ["spool", o.spool ? Object.entries(o.spool).map(([k, v]) => `${k}=${v}`).join(", ") : "none"],
      ].map(([k, v]) => el("div", { class: "total card" }, el("div", { class: "num" }, v), el("div", { class: "muted" }, k)))
    );
    const charts = el(
      "div",
      { class: "charts" },
      barChart("Events in per minute, by type", o.minutes, o.events_in.by_type),
      barChart("Events in per minute, by tenant", o.minutes, o.events_in.by_tenant),
      barChart("Dead letters per minute, by stage", o.minutes, o.dead_letters.by_stage),
      o.duplicates ? barChart("Duplicates dropped per minute", o.minutes, { duplicates: o.duplicates }) : el("figure", { class: "card" }, el("figcaption", {}, "Duplicates dropped per minute"), el("p", { class: "muted" }, "no worker metrics reachable")),
      lineChart("Consumer lag (records)", o.lag)
    );
    const notes = [];
    notes.push(`Kafka tail: ${o.tail.state}` + (o.tail.backfill_partial ? " (the last hour is only partly counted: too many records)" : ""));
    if (o.problems.lag) notes.push("lag: " + o.problems.lag);
    for (const [url, why] of Object.entries(o.problems.metrics)) notes.push(`metrics ${url}: ${why}`);
    box.replaceChildren(cards, charts, el("ul", { class: "notes muted" }, notes.map((n) => el("li", {}, n))));
    shownAt = new Date();
  }
  await refresh();
  const timer = setInterval(
    () =>
      refresh().then(
        () => {
          stale.hidden = true;
        },
        (err) => {
          stale.textContent = `Not refreshed since ${shownAt.toISOString().slice(11, 19)} UTC: ${err.message}`;
          stale.hidden = false;
        }
      ),
    10000
  );
  state.cleanup.push(() => clearInterval(timer));
}

async function liveView(main) {
  const rows = [];
  const buffered = [];
  // topic:partition:offset of every row held (shown or waiting): each (re)connection starts with the latest
  // rows again, and those already here must not be added twice.
  const held = new Set();
  const keyOf = (r) => `${r.topic}:${r.partition}:${r.offset}`;
  const KEEP = 2000;
  let paused = false;
  let dropped = 0; // rows that came while paused beyond the KEEP kept
  const tenant = el("input", { type: "text", placeholder: "tenant", name: "tenant" });
  const type = el("select", { name: "type" }, el("option", { value: "" }, "any type"), state.info.types.map((t) => el("option", { value: t }, t)), el("option", { value: "unknown" }, "unknown"));
  const showDlq = el("input", { type: "checkbox", checked: true, name: "dlq" });
  const pause = el("button", { type: "button", id: "pause" }, "Pause");
  const status = el("span", { class: "muted", id: "live-status" }, "connecting…");
  // The console's own trouble reading Kafka (the stream's `kafka` events): "live" with no rows must not read
  // as no events coming in while the console cannot see any.
  const kafka = el("span", { class: "warn", id: "live-kafka", role: "status" });
  const body = el("tbody", { id: "live-rows" });
  const matches = (r) => (!tenant.value || r.tenant === tenant.value.trim()) && (!type.value || r.type === type.value) && (showDlq.checked || r.kind !== "dlq");
  function tr(r) {
    const target = r.kind === "dlq" ? "#/dlq/" + encodeURIComponent(r.id) : r.event_id ? "#/event/" + encodeURIComponent(r.event_id) : null;
    const open = () => {
      if (target) location.hash = target;
    };
    // The id is a link as well as the row a click target: a row is no stop for the keyboard, and without a
    // link no row could be opened but with a mouse.
    const id = r.event_id || (r.kind === "dlq" ? "dead letter " + r.id : null);
    return el(
      "tr",
      { class: "clickable " + r.kind, onclick: open, "data-event-id": r.event_id || "" },
      el("td", { class: "nowrap" }, when(r.time)),
      el("td", { class: "nowrap" }, r.kind === "dlq" ? "dead letter" : "raw"),
      el("td", {}, r.tenant),
      el("td", {}, r.type),
      el("td", { class: "mono" }, target && id ? el("a", { href: target }, id) : id || "-"),
      el("td", { class: "mono" }, r.subject || "-"),
      el("td", {}, r.error ? el("span", { class: "warn" }, (r.stage ? r.stage + ": " : "") + r.error) : r.status || ""),
      el("td", { class: "mono" }, `${r.partition}:${r.offset}`)
    );
  }
  function render() {
    body.replaceChildren(...rows.filter(matches).slice(0, 500).map(tr));
  }
  function add(r) {
    rows.unshift(r);
    if (rows.length > KEEP) held.delete(keyOf(rows.pop()));
    if (matches(r)) {
      body.prepend(tr(r));
      while (body.children.length > 500) body.lastChild.remove();
    }
  }
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) {
      buffered.splice(0).forEach(add);
      status.textContent = dropped ? `live (${dropped} of the rows that came while paused were not kept: only the latest ${KEEP} are)` : "live";
      dropped = 0;
    }
  });
  const pausedText = () => `paused, ${buffered.length + dropped} new` + (dropped ? ` (the oldest ${dropped} dropped: only the latest ${KEEP} are kept)` : "");
  for (const input of [tenant, type, showDlq]) input.addEventListener("input", render);
  main.append(
    el("h1", {}, "Live"),
    el("div", { class: "controls" }, pause, tenant, type, el("label", {}, showDlq, " dead letters"), status, kafka),
    table(["time", "kind", "tenant", "type", "event id", "subject", "status / error", "partition:offset"], [], { id: "live", class: "rows" })
  );
  main.querySelector("#live tbody").replaceWith(body);
  const source = new EventSource("/api/live");
  state.cleanup.push(() => source.close());
  source.addEventListener("ready", () => {
    status.textContent = paused ? pausedText() : "live";
    kafka.textContent = ""; // a new stream says its own problem, if any, after `ready`
  });
  source.addEventListener("kafka", (e) => {
    const problem = JSON.parse(e.data).problem;
    kafka.textContent = problem ? `the console cannot read Kafka (${problem}): no new rows until it can; they come then` : "";
  });
  source.addEventListener("dropped", (e) => (status.textContent = `live (${e.data} rows skipped: too many to show)`));
  source.onerror = () => {
    const was = paused ? pausedText() + ", " : "";
    if (source.readyState !== EventSource.CLOSED) {
      status.textContent = was + "reconnecting…";
      return;
    }
    // Answered with anything but a stream (a 401 once a restart has signed everyone out), the browser never
    // connects again: the page said "reconnecting…" for good. A sign-in gone leads to the sign-in page.
    status.textContent = was + "disconnected: the console refused the stream; reload the page";
    api("/api/session").catch(() => {});
  };
  source.onmessage = (e) => {
    const r = JSON.parse(e.data);
    if (held.has(keyOf(r))) return;
    held.add(keyOf(r));
    if (paused) {
      buffered.push(r);
      if (buffered.length > KEEP) {
        held.delete(keyOf(buffered.shift()));
        dropped += 1;
      }
      status.textContent = pausedText();
    } else add(r);
  };
}

function recordsSection(title, records) {
  if (!records.length) return el("section", {}, el("h2", {}, title), el("p", { class: "muted" }, "none"));
  return el(
    "section",
    {},
    el("h2", {}, title),
    records.map((f) =>
      el(
        "div",
        { class: "card record" },
        kv([
          ["topic", f.topic],
          ["partition:offset", `${f.partition}:${f.offset}`],
          ["written", when(f.time)],
          ["key", f.key === null ? "-" : f.key],
        ]),
        headersTable(f.headers),
        bodyBlock(f.body)
      )
    )
  );
}

async function eventView(main, id) {
  const searching = el("p", { class: "muted", id: "searching" }, "Searching Kafka and the database…");
  main.append(el("h1", {}, "Event ", el("span", { class: "mono", id: "event-id" }, id), " ", copyButton(() => id, "Copy id")), searching);
  let rep;
  try {
    rep = await api("/api/event?" + query({ id }));
  } finally {
    // Gone on an error too: left above it, the page read as still searching when it had given up.
    searching.remove();
  }
  if (!rep.found) main.append(errorBox("Not found in the raw topic, the dedup table, the routed topics, the database or the DLQ."));
  main.append(recordsSection("Raw record(s)", rep.raw));
  let dedup;
  if (rep.dedup_topic === null) dedup = "no changelog topic (the worker has not run)";
  else if (!rep.dedup) dedup = `not in ${rep.dedup_topic}`;
  else if (rep.dedup.tombstone) dedup = "tombstone: swept out of the dedup window (a redelivery now would be routed again)";
  else {
    // The table marks (id, tenant) pairs: a copy from a tenant not listed would be routed.
    const tenants = Object.entries(rep.dedup.tenants || {});
    const first = rep.dedup.first_routed === null ? "" : `, first routed ${when(rep.dedup.first_routed)}`;
    const marked = tenants.length
      ? " for tenant " + tenants.map(([t, ms]) => `${t} (first routed ${when(ms)})`).join(", tenant ") + "; not for any other tenant"
      : first;
    dedup = `seen${marked} (${rep.dedup.topic}:${rep.dedup.partition}:${rep.dedup.offset})`;
  }
  main.append(el("section", {}, el("h2", {}, "Dedup state"), el("p", { id: "dedup" }, dedup)));
  main.append(recordsSection("Routed record(s)", rep.routed));
  const db = el("section", { id: "db" }, el("h2", {}, "Database rows"));
  if (rep.db_error) db.append(errorBox(rep.db_error));
  let any = false;
  for (const [name, list] of Object.entries(rep.rows)) {
    if (!list.length) continue;
    any = true;
    const cols = Object.keys(list[0]);
    db.append(el("h3", {}, name), el("div", { class: "scroll" }, table(cols, list.map((row) => el("tr", {}, cols.map((c) => el("td", { class: "mono" }, cell(row[c]))))))));
  }
  if (!any && !rep.db_error) db.append(el("p", { class: "muted" }, "no rows"));
  main.append(db);
  const dlq = el("section", {}, el("h2", {}, "DLQ entries"));
  if (!rep.dlq.length) dlq.append(el("p", { class: "muted" }, "none"));
  for (const e of rep.dlq) {
    dlq.append(el("div", { class: "card record" }, kv([["id", el("a", { href: "#/dlq/" + encodeURIComponent(e.id) }, e.id)], ["dead-lettered", when(e.time)], ["stage", e.stage], ["error", e.error], ["message", e.message], ["attempts", e.attempts]]), headersTable(e.headers), bodyBlock(e.body)));
  }
  main.append(dlq, el("details", {}, el("summary", {}, "What was searched"), el("ul", {}, rep.notes.map((n) => el("li", {}, n)))));
}

async function searchView(main) {
  const f = {
    q: el("input", { type: "text", name: "q", placeholder: "event, message or template id", size: 40 }),
    tenant: el("input", { type: "text", name: "tenant", placeholder: "tenant" }),
    type: el("select", { name: "type" }, el("option", { value: "" }, "any type"), state.info.routed_types.map((t) => el("option", { value: t }, t))),
    since: el("input", { type: "datetime-local", name: "since", step: 1 }),
    until: el("input", { type: "datetime-local", name: "until", step: 1 }),
  };
  // Where each page shown so far started (null: the first): Next starts after the last row shown (the
  // search's `next`), Previous goes back to where the page before started. Offsets shifted as events came
  // in, repeating rows on the next page; a cursor does not move.
  const starts = [null];
  let filters = null; // the form as searched: Next and Previous keep to it, whatever was typed since
  const out = el("div", { id: "results" });
  async function run() {
    out.replaceChildren(el("p", { class: "muted" }, "Searching…"));
    const page = starts.length - 1;
    try {
      const res = await api("/api/search?" + query(Object.assign({}, filters, { after: starts[page] })));
      const rows = res.rows.map((r) => el("tr", {}, el("td", {}, when(r.at)), el("td", {}, r.type), el("td", {}, r.tenant), el("td", {}, eventLink(r.event_id)), el("td", { class: "mono" }, r.subject), el("td", {}, r.status || "")));
      const prev = el("button", { type: "button", id: "search-prev", disabled: page === 0, onclick: () => { starts.pop(); run(); } }, "Previous");
      const next = el("button", { type: "button", id: "search-next", disabled: !res.next, onclick: () => { starts.push(res.next); run(); } }, "Next");
      out.replaceChildren(
        rows.length ? table(["time", "type", "tenant", "event id", "message / template id", "status"], rows, { class: "rows" }) : el("p", { class: "muted" }, "No events match."),
        el("div", { class: "controls" }, prev, el("span", { id: "search-page" }, `page ${page + 1}`), next)
      );
    } catch (err) {
      out.replaceChildren(errorBox(err.message));
    }
  }
  function searched() {
    filters = { q: f.q.value.trim(), tenant: f.tenant.value.trim(), type: f.type.value, since: isoFromLocal(f.since.value), until: isoFromLocal(f.until.value) };
    starts.splice(1);
    return run();
  }
  const form = el("form", { class: "controls", onsubmit: (e) => { e.preventDefault(); searched(); } }, Object.values(f), el("button", { type: "submit" }, "Search"));
  main.append(el("h1", {}, "Search"), el("p", { class: "muted" }, "Events the projector applied (the history tables), newest first."), form, out);
  await searched();
}

async function dlqView(main, id) {
  if (id) return dlqEntryView(main, id);
  const f = {
    stage: el("select", { name: "stage" }, el("option", { value: "" }, "any stage"), state.info.stages.map((s) => el("option", { value: s }, s))),
    reason: el("input", { type: "text", name: "reason", placeholder: "error class, e.g. PermanentError" }),
    since: el("input", { type: "datetime-local", name: "since", step: 1 }),
    limit: el("input", { type: "number", name: "limit", value: 50, min: 1, max: 1000 }),
  };
  const list = el("div", { id: "dlq-list" });
  const redrive = el("div", { id: "redrive" });
  const selected = new Set();
  const filters = () => ({ stages: f.stage.value ? [f.stage.value] : [], reasons: f.reason.value.trim() ? [f.reason.value.trim()] : [], since: isoFromLocal(f.since.value) });
  async function load() {
    selected.clear();
    list.replaceChildren(el("p", { class: "muted" }, "Reading the DLQ…"));
    try {
      const fl = filters();
      const res = await api("/api/dlq?" + query({ stage: fl.stages.join(","), reason: fl.reasons.join(","), since: fl.since, limit: f.limit.value }));
      const rows = res.entries.map((e) =>
        el(
          "tr",
          { "data-id": e.id },
          el("td", {}, el("input", { type: "checkbox", "aria-label": "select " + e.id, onchange: (ev) => { if (ev.target.checked) selected.add(e.id); else selected.delete(e.id); panel(); } })),
          el("td", {}, el("a", { href: "#/dlq/" + encodeURIComponent(e.id), class: "mono" }, e.id)),
          el("td", {}, when(e.time)),
          el("td", {}, e.stage),
          el("td", {}, e.error),
          el("td", { class: "mono" }, e.event_id ? eventLink(e.event_id) : "key " + cell(e.key)),
          el("td", {}, cell(e.type)),
          el("td", {}, cell(e.tenant)),
          el("td", { class: "mono" }, cell(e.original)),
          el("td", {}, e.attempts)
        )
      );
      list.replaceChildren(
        rows.length ? table(["", "ID", "dead-lettered", "stage", "error", "event / key", "type", "tenant", "original", "attempts"], rows, { class: "rows" }) : el("p", { class: "muted" }, "No dead letters match."),
        el("p", { class: "muted", id: "dlq-count" }, `${res.entries.length} shown, ${res.matched} matching, ${res.total} in the DLQ` + (res.redriven ? `; ${res.redriven} more matching were taken by a redrive (not listed)` : ""))
      );
    } catch (err) {
      list.replaceChildren(errorBox(err.message));
    }
    panel();
  }
  function panel() {
    const what = selected.size ? `the ${selected.size} selected record(s)` : "every record matching the filters";
    const body = () => Object.assign(filters(), { ids: [...selected] });
    redrive.replaceChildren(redrivePanel(what, body, load));
  }
  const form = el("form", { class: "controls", onsubmit: (e) => { e.preventDefault(); load(); } }, Object.values(f), el("button", { type: "submit" }, "Filter"));
  main.append(el("h1", {}, "Dead letters"), form, list, redrive);
  await load();
}

// A dry run first; then `run` does the real job with exactly the body the dry run counted (frozen when
// the dry run started, so edits made since cannot widen it).
function dryThenRun(dry, run, stop, out, progress, { url, body, show, counted, after }) {
  let frozen = null;
  dry.addEventListener("click", async () => {
    dry.disabled = run.disabled = true;
    out.replaceChildren();
    try {
      frozen = body();
      const result = await runJob(url, Object.assign({}, frozen, { dry_run: true }), progress, stop);
      out.replaceChildren(show(result));
      run.disabled = !counted(result);
    } catch (err) {
      out.replaceChildren(jobEnd(err));
    }
    dry.disabled = false;
  });
  run.addEventListener("click", async () => {
    dry.disabled = run.disabled = true;
    try {
      const result = await runJob(url, Object.assign({}, frozen, { dry_run: false }), progress, stop);
      out.replaceChildren(show(result));
      if (after) after();
    } catch (err) {
      out.replaceChildren(jobEnd(err));
    }
    dry.disabled = false;
  });
}

// Dry run first, then the real redrive of exactly the same selection.
function redrivePanel(what, body, after) {
  const progress = el("progress", { hidden: true });
  const out = el("div", {});
  const run = el("button", { type: "button", id: "redrive-run", disabled: true }, "Redrive");
  const dry = el("button", { type: "button", id: "redrive-dry" }, "Count (dry run)");
  const stop = el("button", { type: "button", id: "redrive-stop", hidden: true }, "Stop");
  dryThenRun(dry, run, stop, out, progress, {
    url: "/api/dlq/redrive",
    body,
    show: (result) => resultView(result, "redriven", ["stage", "topic"]),
    counted: (result) => {
      run.textContent = `Redrive ${result.sent} record(s)`;
      // What would be sent: not read > 0 (every record taken by an earlier redrive offered "Redrive 0
      // record(s)"), nor the records a redrive keeps (no stage, a topic no redrive can send to), which it
      // counts as failed and never sends.
      return result.sent > 0;
    },
    after: () => {
      if (after) out.append(el("button", { type: "button", onclick: after }, "Reload the list"));
    },
  });
  return el("div", { class: "card" }, el("h2", {}, "Redrive"), el("p", {}, "Sends " + what + " back into the pipeline. Count first."), el("div", { class: "controls" }, dry, run, stop, progress), out);
}

async function dlqEntryView(main, id) {
  const e = await api("/api/dlq/entry?" + query({ id }));
  main.append(
    el("h1", {}, "Dead letter ", el("span", { class: "mono" }, e.id)),
    el("p", {}, el("a", { href: "#/dlq" }, "All dead letters")),
    el(
      "div",
      { class: "card record" },
      kv([
        ["dead-lettered", when(e.time)],
        ["stage", e.stage],
        ["error", e.error],
        ["message", e.message],
        ["event", e.event_id ? eventLink(e.event_id) : "-"],
        ["key", cell(e.key)],
        ["type / tenant", `${cell(e.type)} / ${cell(e.tenant)}`],
        ["original", cell(e.original)],
        ["attempts", e.attempts],
      ]),
      headersTable(e.headers),
      bodyBlock(e.body)
    ),
    redrivePanel("this record", () => ({ ids: [e.id] }), null)
  );
}

async function replayView(main) {
  const f = {
    since: el("input", { type: "datetime-local", name: "since", step: 1 }),
    until: el("input", { type: "datetime-local", name: "until", step: 1 }),
    from_offsets: el("input", { type: "text", name: "from_offsets", placeholder: "e.g. 3:1200, 4:0" }),
    to_offsets: el("input", { type: "text", name: "to_offsets", placeholder: "e.g. 3:1300 (inclusive)" }),
    tenants: el("input", { type: "text", name: "tenants", placeholder: "comma-separated; empty: all" }),
    event_ids: el("input", { type: "text", name: "event_ids", placeholder: "comma-separated; empty: all" }),
  };
  const types = state.info.types.map((t) => el("label", { class: "check" }, el("input", { type: "checkbox", name: "type", value: t }), " " + t));
  const progress = el("progress", { hidden: true, id: "replay-progress" });
  const out = el("div", { id: "replay-result" });
  const dry = el("button", { type: "button", id: "replay-dry" }, "Dry run");
  const run = el("button", { type: "button", id: "replay-run", disabled: true }, "Replay");
  const stop = el("button", { type: "button", id: "replay-stop", hidden: true }, "Stop");
  const body = () => ({
    since: isoFromLocal(f.since.value),
    until: isoFromLocal(f.until.value),
    from_offsets: commaList(f.from_offsets.value),
    to_offsets: commaList(f.to_offsets.value),
    tenants: commaList(f.tenants.value),
    event_ids: commaList(f.event_ids.value),
    types: types.map((l) => l.firstChild).filter((c) => c.checked).map((c) => c.value),
  });
  const form = el(
    "form",
    { class: "grid", oninput: () => { run.disabled = true; } },
    el("label", {}, "Since ", f.since),
    el("label", {}, "Until ", f.until),
    el("label", {}, "From offsets ", f.from_offsets),
    el("label", {}, "To offsets ", f.to_offsets),
    el("label", {}, "Tenants ", f.tenants),
    el("label", {}, "Event ids ", f.event_ids),
    el("fieldset", {}, el("legend", {}, "Types (none: all)"), types)
  );
  dryThenRun(dry, run, stop, out, progress, {
    url: "/api/replay",
    body,
    show: (result) => resultView(result, "replayed", ["type", "tenant"]),
    counted: (result) => {
      run.textContent = `Replay ${result.sent} event(s)`;
      return result.sent > 0;
    },
  });
  main.append(
    el("h1", {}, "Replay"),
    el("p", { class: "muted" }, "Routes raw events again, straight to the routed topics (bypassing the dedup table), so every projection and handler applies them again. Count with a dry run first; one replay at a time."),
    form,
    el("div", { class: "controls" }, dry, run, stop, progress),
    out
  );
  const current = await api("/api/jobs/current");
  if (current && current.state === "running") {
    out.replaceChildren(el("p", { class: "warn" }, `A ${current.kind} is running (${current.done} of ${current.total === null ? "?" : current.total}).`));
  }
}

async function triggerView(main) {
  if (!state.info.trigger) {
    main.append(el("h1", {}, "Send a test event"), errorBox("Only while the built-in development secret is in use."));
    return;
  }
  const type = el("select", { name: "type" }, state.info.routed_types.map((t) => el("option", { value: t }, t)));
  const status = el("input", { type: "text", name: "status", placeholder: "status, e.g. delivered / approved (optional)" });
  const shape = el("select", { name: "shape" }, ["sent", "guide"].map((s) => el("option", { value: s }, s)));
  const out = el("div", { id: "trigger-result" });
  const send = el("button", { type: "submit", id: "trigger-send" }, "Send");
  const form = el(
    "form",
    {
      class: "controls",
      onsubmit: async (e) => {
        e.preventDefault();
        send.disabled = true;
        try {
          const res = await post("/api/trigger", { type: type.value, status: status.value.trim(), shape: shape.value });
          out.replaceChildren(
            el("div", { class: "card" }, kv([["POST", res.url], ["x-webhook-id", res.webhook_id], ["answer", res.status === null ? res.outcome : `HTTP ${res.status}`], ["event", res.event_id ? eventLink(res.event_id) : "-"]]), el("h3", {}, "Answer"), bodyBlock(res.answer), el("h3", {}, "Event sent"), bodyBlock(res.event))
          );
        } catch (err) {
          out.replaceChildren(errorBox(err.message));
        }
        send.disabled = false;
      },
    },
    type,
    status,
    shape,
    send
  );
  main.append(el("h1", {}, "Send a test event"), el("p", { class: "muted" }, "One signed event, exactly as `sentpipe trigger` sends it, to this machine's ingress."), form, out);
}

// --- router ------------------------------------------------------------------------------------------------
const VIEWS = { overview: overviewView, live: liveView, event: eventView, search: searchView, dlq: dlqView, replay: replayView, trigger: triggerView };

function decoded(text) {
  // A `%` typed into the address that starts no escape: taken as typed. Thrown, the URIError left the page
  // showing the view before, unanswered.
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

async function route() {
  state.cleanup.splice(0).forEach((fn) => fn());
  const [, name, ...rest] = location.hash.split("/");
  const view = VIEWS[name] ? name : "overview";
  const arg = rest.length ? decoded(rest.join("/")) : "";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view || (view === "event" && a.dataset.view === "search"));
  const main = document.getElementById("view");
  delete main.dataset.ready;
  main.replaceChildren();
  main.dataset.view = view;
  try {
    await VIEWS[view](main, arg);
  } catch (err) {
    main.append(errorBox(err.message));
  }
  main.dataset.ready = view;
}

async function start() {
  state.info = await api("/api/session");
  state.csrf = state.info.csrf;
  document.getElementById("nav-trigger").hidden = !state.info.trigger;
  document.getElementById("prefix").textContent = "topics " + state.info.topic_prefix + "*";
  const logout = document.getElementById("logout");
  logout.hidden = !state.info.signed_in;
  logout.addEventListener("click", async () => {
    await fetch("/logout", { method: "POST", headers: { "X-CSRF-Token": state.csrf }, credentials: "same-origin" });
    location.href = "/login";
  });
  window.addEventListener("hashchange", route);
  await route();
}

start().catch((err) => document.getElementById("view").replaceChildren(errorBox(err.message)));
