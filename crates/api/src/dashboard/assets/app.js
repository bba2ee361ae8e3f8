// The ferrosync dashboard: asks for an admin token once (kept in sessionStorage), polls the
// admin status route, and keeps a rolling window of samples for the charts.
"use strict";
(() => {
  const TOKEN_KEY = "ferrosync.adminToken";
  const query = new URLSearchParams(location.search);
  const POLL_MS = Number(query.get("poll")) || 1000;
  // Largest buckets come from a scan of the op log: seldom.
  const STATS_MS = Number(query.get("stats")) || 30 * 1000;
  const WINDOW_MS = 120 * 1000;

  const $ = (id) => document.getElementById(id);
  const series = { lagSeconds: [], lagBytes: [], rowsRate: [], opsRate: [] };
  let previous = null;
  let statsAt = 0;
  let timer = null;

  class AuthError extends Error {}
  class Unreachable extends Error {}

  function el(tag, attrs, ...children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") n.className = v;
      else n.setAttribute(k, v);
    }
    for (const c of children) n.append(c instanceof Node ? c : String(c ?? ""));
    return n;
  }

  const fmt = {
    int: (v) => Math.round(v).toLocaleString("en-US"),
    rate: (v) => (v >= 100 ? fmt.int(v) : v.toFixed(1)),
    seconds: (v) => (v == null ? "unknown" : v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(1)} s`),
    bytes: (v) => {
      if (v == null) return "unknown";
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let i = 0;
      while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
      return `${i ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
    },
    time: (ms) => new Date(ms).toLocaleTimeString("en-GB"),
  };

  async function api(path, body) {
    const init = { headers: { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY)}` }, cache: "no-store" };
    if (body !== undefined) {
      init.method = "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new Unreachable(e.message);
    }
    const text = await response.text();
    let json = null;
    try { json = JSON.parse(text); } catch (_) { /* an error page from a proxy, say */ }
    const error = json && json.error ? `${json.error.description || "error"}${json.error.details ? `: ${json.error.details}` : ""} [${json.error.code}]` : `HTTP ${response.status}`;
    if (response.status === 401) throw new AuthError(error);
    if (response.status === 502 || response.status === 503 || response.status === 504) throw new Unreachable(error);
    if (!response.ok) throw new Error(error);
    return json;
  }

  function push(list, t, v) {
    list.push({ t, v });
    while (list.length && list[0].t < t - WINDOW_MS) list.shift();
  }

  function sample(status) {
    const t = status.time_ms;
    // An unknown lag (not measured yet) is a gap, not a zero.
    if (status.lag.seconds != null) push(series.lagSeconds, t, status.lag.seconds);
    if (status.lag.bytes != null) push(series.lagBytes, t, status.lag.bytes);
    if (previous && t > previous.time_ms) {
      const dt = (t - previous.time_ms) / 1000;
      const rate = (key) => Math.max(0, status.totals[key] - previous.totals[key]) / dt;
      push(series.rowsRate, t, rate("rows_replicated"));
      push(series.opsRate, t, rate("operations_synced"));
    }
    previous = status;
  }

  function pill(node, text, good) {
    node.textContent = text;
    node.className = `pill ${good ? "good" : "bad"}`;
  }

  function stats(node, pairs) {
    node.replaceChildren(...pairs.flatMap(([k, v, id]) => [el("dt", {}, k), el("dd", id ? { "data-key": id } : {}, v)]));
  }

  function renderStatus(s) {
    const r = s.replication;
    pill($("pill-replication"), `replication ${r.state}${r.error ? `: ${r.error}` : ""}`, r.state === "streaming" || r.state === "snapshot");
    pill($("pill-storage"), s.storage.ok ? "storage ok" : `storage: ${s.storage.error}`, s.storage.ok);
    pill($("pill-ready"), s.ready ? "ready" : "not ready", s.ready);
    $("checkpoint").textContent = s.checkpoint ? `sync config #${s.checkpoint.sync_config} · op ${s.checkpoint.op_id} · LSN ${s.checkpoint.lsn}` : "no active sync config";
    const now = s.time_ms;
    const chart = (name, list, format, value) => {
      Chart.draw($(`chart-${name}`), list, now, WINDOW_MS, format);
      $(`v-${name}`).textContent = value;
    };
    const last = (list) => (list.length ? list[list.length - 1].v : 0);
    chart("lag-seconds", series.lagSeconds, fmt.seconds, fmt.seconds(s.lag.seconds));
    chart("lag-bytes", series.lagBytes, fmt.bytes, fmt.bytes(s.lag.bytes));
    chart("rows-rate", series.rowsRate, fmt.rate, fmt.rate(last(series.rowsRate)));
    chart("ops-rate", series.opsRate, fmt.rate, fmt.rate(last(series.opsRate)));
    renderSnapshot(s.snapshot);
    const c = s.connections;
    stats($("connections"), [["total", fmt.int(c.total), "total"], ["HTTP", fmt.int(c.http), "http"], ["WebSocket", fmt.int(c.websocket), "websocket"]]);
    const b = s.storage_bytes;
    stats($("storage"), [["current rows", fmt.bytes(b.replication)], ["operations", fmt.bytes(b.operations)], ["parameter lookups", fmt.bytes(b.parameters)],
      ["rows replicated", fmt.int(s.totals.rows_replicated)], ["ops synced", fmt.int(s.totals.operations_synced)]]);
    renderErrors(s.recent_errors, s.errors_by_code);
  }

  function renderSnapshot(tables) {
    if (!tables.length) return;
    $("snapshot").replaceChildren(...tables.map((t) => {
      const total = Math.max(t.estimated, t.rows, 1);
      const bar = el("progress", { max: total, value: t.rows });
      const pct = Math.min(100, Math.round((t.rows / total) * 100));
      // The planner's estimate is 0 for a table never analyzed: then only the count means anything.
      const label = t.estimated > 0 ? `${fmt.int(t.rows)} of ~${fmt.int(t.estimated)} rows · ${pct}%` : `${fmt.int(t.rows)} rows`;
      return el("div", { class: "progress", "data-table": t.table, "data-rows": t.rows },
        el("div", {}, el("span", {}, t.table), el("span", { class: "muted" }, label)), bar);
    }));
  }

  function renderErrors(errors, byCode) {
    $("errors-by-code").textContent = Object.entries(byCode).map(([code, n]) => `${code} ×${n}`).join(" · ");
    const rows = errors.map((e) => el("tr", { class: `level-${e.level}` }, el("td", {}, fmt.time(e.time_ms)), el("td", {}, e.level), el("td", {}, e.code || ""), el("td", { class: "message" }, e.message)));
    $("errors").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 4, class: "muted" }, "No warnings or errors logged."))]));
  }

  function renderBuckets(stats) {
    const rows = stats.largest_buckets.map((b) => el("tr", {}, el("td", { class: "mono" }, b.bucket), el("td", {}, b.definition ?? "?"), el("td", { class: "num" }, fmt.int(b.ops)), el("td", { class: "num" }, fmt.bytes(b.bytes))));
    $("buckets").tBodies[0].replaceChildren(...rows);
    $("buckets-note").textContent = rows.length ? "" : "No buckets yet.";
  }

  // Largest buckets need an active sync config and storage: their failure is the card's, not
  // the page's (status already reports storage and replication).
  async function refreshBuckets() {
    try {
      renderBuckets((await api("/api/admin/v1/storage-stats")).data);
    } catch (e) {
      if (e instanceof AuthError) throw e;
      $("buckets-note").textContent = `Not available: ${e.message}`;
    }
  }

  function banner(text) {
    // What is shown is the last answer: dimmed while it may be stale.
    document.body.classList.toggle("stale", Boolean(text));
    $("banner").hidden = !text;
    $("banner").textContent = text || "";
  }

  async function poll() {
    try {
      const status = await api("/api/admin/v1/status");
      sample(status);
      renderStatus(status);
      banner(null);
      if (Date.now() - statsAt >= STATS_MS) {
        statsAt = Date.now();
        await refreshBuckets();
      }
    } catch (e) {
      if (e instanceof AuthError) return signOut(`The admin token was refused: ${e.message}`);
      banner(e instanceof Unreachable ? `Service unreachable (${e.message}). Showing the last data; retrying every ${POLL_MS / 1000} s.` : `Error: ${e.message}`);
    }
    timer = setTimeout(poll, POLL_MS);
  }

  function signOut(message) {
    clearTimeout(timer);
    sessionStorage.removeItem(TOKEN_KEY);
    $("main").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    banner(null);
  }

  function start() {
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    previous = null;
    statsAt = 0;
    Object.values(series).forEach((list) => list.splice(0));
    poll();
  }

  async function inspect(event) {
    event.preventDefault();
    const input = $("inspect-input").value.trim();
    const out = $("inspect-result");
    let body;
    if (input.startsWith("{")) {
      try { body = { claims: JSON.parse(input) }; } catch (e) { out.replaceChildren(el("p", { class: "error" }, `Not valid JSON: ${e.message}`)); return; }
    } else {
      body = { token: input };
    }
    out.replaceChildren(el("p", { class: "muted" }, "Resolving…"));
    try {
      renderInspection((await api("/api/admin/v1/inspect", body)).data);
    } catch (e) {
      // A token being inspected that the service refuses is a 400; a 401 is the admin's token.
      if (e instanceof AuthError) return signOut(`The admin token was refused: ${e.message}`);
      out.replaceChildren(el("p", { class: "error", "data-error": "1" }, e.message));
    }
  }

  function renderInspection(r) {
    const totals = r.totals || { buckets: r.buckets.length, ops: 0, rows: 0 };
    const head = el("p", {}, r.claims_verified ? `Token verified: user ${r.user_id}.` : `Claims used unverified (user ${r.user_id ?? "none"}).`,
      " ", el("b", { "data-totals": "1" }, `${totals.buckets} bucket(s), ${fmt.int(totals.ops)} op(s), ${fmt.int(totals.rows)} row(s)`));
    const rows = r.buckets.map((b) => el("tr", { "data-bucket": b.bucket, "data-ops": b.ops, "data-rows": b.rows },
      el("td", { class: "mono" }, b.bucket), el("td", {}, b.definition), el("td", { class: "num" }, b.priority), el("td", {}, b.reasons.join("; ")),
      el("td", { class: "num" }, b.ops == null ? "?" : fmt.int(b.ops)), el("td", { class: "num" }, b.rows == null ? "?" : fmt.int(b.rows))));
    const table = el("table", {}, el("thead", {}, el("tr", {}, ...["bucket", "definition", "priority", "why", "ops", "rows"].map((h) => el("th", {}, h)))), el("tbody", {}, ...rows));
    const notes = [...(r.errors || []), ...(r.hints || [])].map((n) => el("li", {}, n));
    $("inspect-result").replaceChildren(head, table, ...(notes.length ? [el("ul", { class: "muted" }, ...notes)] : []));
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    start();
  });
  $("logout").addEventListener("click", () => signOut());
  $("inspect-form").addEventListener("submit", inspect);
  if (sessionStorage.getItem(TOKEN_KEY)) start(); else signOut();
})();
