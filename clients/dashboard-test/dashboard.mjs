// Drives the ferrosync dashboard in a headless Chromium (the system's, through playwright-core)
// for the e2e test: one JSON command per stdin line, one JSON answer per stdout line
// ({"id", "ok", "result"|"error"}), like clients/node-agent.
import { chromium } from "playwright-core";
import { existsSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { dirname } from "node:path";
import { createInterface } from "node:readline";

// The distribution's Chromium: Debian's /usr/bin/chromium is a wrapper script around this.
const CANDIDATES = [process.env.CHROMIUM_PATH, "/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"];

let browser = null;
let page = null;
const consoleErrors = [];

// The Chromium that `open` would launch, or null (the test decides whether that is a failure).
async function findChromium() {
  return CANDIDATES.find((p) => p && existsSync(p)) ?? null;
}

async function open({ url, poll_ms, stats_ms }) {
  const executablePath = await findChromium();
  if (!executablePath) throw new Error(`no Chromium found (tried ${CANDIDATES.filter(Boolean).join(", ")})`);
  // --no-sandbox: tests run as root in containers, where Chromium's sandbox cannot start.
  browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-dev-shm-usage"] });
  page = await browser.newPage({ viewport: { width: 1400, height: 1100 } });
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  await page.goto(`${url}/dashboard?poll=${poll_ms}&stats=${stats_ms}`);
  return { executable: executablePath, title: await page.title() };
}

// Submit `token` on the login form; answers once the dashboard shows data or refuses it.
async function login({ token }) {
  if (await page.locator("#logout").isVisible()) await page.click("#logout");
  await page.fill("#token-input", token);
  await page.click("#login-form button");
  await page.waitForFunction(() => {
    const err = document.getElementById("login-error").textContent;
    return err || document.getElementById("checkpoint").textContent;
  }, null, { timeout: 15000 });
  return {
    dashboard_visible: await page.locator("#main").isVisible(),
    error: await page.textContent("#login-error"),
  };
}

// Everything the page shows, as data.
async function read() {
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent;
    const chart = (name) => {
      const svg = document.getElementById(`chart-${name}`);
      const line = svg.querySelector("polyline");
      return { value: text(`v-${name}`), points: Number(svg.dataset.points || 0), last: Number(svg.dataset.last || 0), max: Number(svg.dataset.max || 0), polyline: line ? line.getAttribute("points") : "" };
    };
    const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)].map((tr) => [...tr.cells].map((td) => td.textContent));
    const stats = (id) => Object.fromEntries([...document.querySelectorAll(`#${id} dd[data-key]`)].map((dd) => [dd.dataset.key, dd.textContent]));
    return {
      banner: document.getElementById("banner").hidden ? null : text("banner"),
      replication: text("pill-replication"),
      storage: text("pill-storage"),
      ready: text("pill-ready"),
      checkpoint: text("checkpoint"),
      charts: { lag_seconds: chart("lag-seconds"), lag_bytes: chart("lag-bytes"), rows_rate: chart("rows-rate"), ops_rate: chart("ops-rate") },
      snapshot: [...document.querySelectorAll("#snapshot .progress")].map((p) => {
        const bar = p.querySelector("progress");
        return { table: p.dataset.table, rows: Number(p.dataset.rows), value: Number(bar.value), max: Number(bar.max), label: p.textContent };
      }),
      connections: stats("connections"),
      buckets: rows("buckets"),
      errors: rows("errors"),
    };
  });
}

// Ask the inspector about `input` (a JWT or claims JSON); answers with its table or its error.
async function inspect({ input }) {
  // A previous answer must not pass for this one.
  await page.evaluate(() => document.getElementById("inspect-result").replaceChildren());
  await page.fill("#inspect-input", input);
  await page.click("#inspect-form button");
  await page.waitForSelector("#inspect-result table, #inspect-result .error", { timeout: 30000 });
  return page.evaluate(() => {
    const result = document.getElementById("inspect-result");
    const error = result.querySelector(".error");
    if (error) return { error: error.textContent };
    return {
      totals: result.querySelector("[data-totals]").textContent,
      buckets: [...result.querySelectorAll("tr[data-bucket]")].map((tr) => ({ bucket: tr.dataset.bucket, ops: Number(tr.dataset.ops), rows: Number(tr.dataset.rows), reason: tr.cells[3].textContent, definition: tr.cells[1].textContent })),
    };
  });
}

async function screenshot({ path }) {
  await mkdir(dirname(path), { recursive: true });
  await page.screenshot({ path, fullPage: true });
  return { path };
}

const commands = {
  chromium: findChromium, open, login, read, inspect, screenshot,
  console_errors: async () => consoleErrors,
  close: async () => { await browser?.close(); browser = null; return {}; },
};

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  let cmd = {};
  try {
    cmd = JSON.parse(line);
    const run = commands[cmd.cmd];
    if (!run) throw new Error(`unknown command ${cmd.cmd}`);
    process.stdout.write(JSON.stringify({ id: cmd.id, ok: true, result: await run(cmd) }) + "\n");
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: cmd.id, ok: false, error: String(e && e.stack || e) }) + "\n");
  }
}
await browser?.close();
