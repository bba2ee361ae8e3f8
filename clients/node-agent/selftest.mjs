#!/usr/bin/env node
// Self-test for agent.mjs. Exits 0 on success.
//
// Phase 1 (the basic contract): open / status / query on empty tables / connect to an endpoint
// where nothing listens (127.0.0.1:1) -> status shows not connected, no crash / close.
// Phase 2: a tiny in-process fake sync service speaking the NDJSON HTTP protocol. Checks that the
// real client downloads a checkpoint, exposes the rows and bucket positions, and that
// checksum_failures stays 0; then that a bad bucket checksum is counted in checksum_failures.
// Neither phase needs anything but loopback.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const verbose = process.env.SELFTEST_VERBOSE === '1';

class Agent {
  constructor(name) {
    this.name = name;
    this.nextId = 1;
    this.pending = new Map();
    this.exited = null;
    this.proc = spawn(process.execPath, [path.join(here, 'agent.mjs')], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: { ...process.env, FERROSYNC_AGENT_LOG: process.env.FERROSYNC_AGENT_LOG ?? 'debug' }
    });
    this.stderr = '';
    this.proc.stderr.on('data', (d) => {
      this.stderr += d;
      if (verbose) process.stderr.write(`[${name}] ${d}`);
    });
    this.exitPromise = new Promise((resolve) => {
      this.proc.on('exit', (code, signal) => {
        this.exited = { code, signal };
        for (const { reject } of this.pending.values()) reject(new Error(`agent exited (${code}, ${signal})`));
        this.pending.clear();
        resolve(this.exited);
      });
    });
    const rl = readline.createInterface({ input: this.proc.stdout });
    rl.on('line', (line) => {
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        fail(`agent wrote a non-JSON line to stdout: ${line}`);
      }
      const p = this.pending.get(msg.id);
      if (!p) fail(`response with unexpected id: ${line}`);
      this.pending.delete(msg.id);
      p.resolve(msg);
    });
  }

  // Returns the raw response.
  send(cmd, args = {}, timeoutMs = 60000) {
    const id = this.nextId++;
    const line = JSON.stringify({ id, cmd, ...args });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timeout waiting for ${cmd}`)), timeoutMs);
      this.pending.set(id, {
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        }
      });
      this.proc.stdin.write(line + '\n');
    });
  }

  // Returns result, throws on ok:false.
  async call(cmd, args = {}, timeoutMs) {
    const r = await this.send(cmd, args, timeoutMs);
    if (!r.ok) throw new Error(`${cmd} failed: ${r.error}`);
    return r.result;
  }

  async end() {
    this.proc.stdin.end();
    const t = setTimeout(() => this.proc.kill('SIGKILL'), 20000);
    const r = await this.exitPromise;
    clearTimeout(t);
    return r;
  }
}

function fail(msg) {
  console.error(`SELFTEST FAILED: ${msg}`);
  process.exit(1);
}

function check(cond, msg) {
  if (!cond) fail(msg);
  console.error(`ok - ${msg}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function phase1(dir) {
  const agent = new Agent('phase1');
  const opened = await agent.call('open', { db_path: path.join(dir, 'p1.sqlite') });
  check(opened.packages['@powersync/node'] === '1.1.0', `open: @powersync/node ${opened.packages['@powersync/node']}`);

  let st = await agent.call('status');
  check(st.connected === false && st.crud_pending === 0 && st.checksum_failures === 0, 'status after open');

  check((await agent.call('query', { sql: 'SELECT * FROM lists' })).length === 0, 'lists empty');
  check((await agent.call('query', { sql: 'SELECT * FROM todos' })).length === 0, 'todos empty');
  check(Array.isArray(await agent.call('buckets')), 'buckets returns an array');

  const bad = await agent.send('no_such_command');
  check(bad.ok === false && typeof bad.error === 'string', 'unknown command -> ok:false');

  await agent.call('connect', { endpoint: 'http://127.0.0.1:1', token: 'x.y.z', connection_method: 'http' });
  await sleep(2000);
  st = await agent.call('status');
  check(st.connected === false, `not connected to 127.0.0.1:1 (downloadError: ${st.dataFlow.downloadError})`);
  check(st.credential_fetches >= 1, 'connector.fetchCredentials was called');

  const w = await agent.send('wait_first_sync', { timeout_ms: 500 });
  check(w.ok === false && /timed out/.test(w.error), 'wait_first_sync times out with status');

  // A local write queues in ps_crud; without source_url the upload fails and is retried.
  await agent.call('execute', {
    sql: 'INSERT INTO lists (id, name, created_at, owner_id) VALUES (uuid(), ?, datetime(), ?)',
    params: ['l', 'u']
  });
  st = await agent.call('status');
  check(st.crud_pending === 1, 'local write queued in ps_crud');

  await agent.call('disconnect');
  await agent.call('close');
  const ex = await agent.end();
  check(ex.code === 0, `agent exited 0 after close + stdin EOF (got ${ex.code})`);
}

// ---- Phase 2: minimal fake sync service (HTTP, NDJSON) ----

function startFakeService({ bucketChecksum }) {
  const requests = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => (body += d));
    req.on('end', () => {
      requests.push({ method: req.method, url: req.url, headers: req.headers, body });
      if (req.method === 'POST' && req.url === '/sync/stream') {
        res.writeHead(200, { 'content-type': 'application/x-ndjson' });
        const lines = [
          { checkpoint: { last_op_id: '2', write_checkpoint: null, buckets: [{ bucket: 'global[]', checksum: bucketChecksum, priority: 3, count: 2 }] } },
          {
            data: {
              bucket: 'global[]',
              after: '0',
              next_after: '2',
              has_more: false,
              data: [
                { op_id: '1', op: 'PUT', object_type: 'lists', object_id: 'list-1', checksum: 100, data: JSON.stringify({ name: 'Groceries', owner_id: 'u1', created_at: '2024-01-01T00:00:00Z' }) },
                { op_id: '2', op: 'PUT', object_type: 'todos', object_id: 'todo-1', checksum: 23, data: JSON.stringify({ list_id: 'list-1', description: 'milk', completed: 0 }) }
              ]
            }
          },
          { checkpoint_complete: { last_op_id: '2' } },
          { token_expires_in: 3600 }
        ];
        for (const l of lines) res.write(JSON.stringify(l) + '\n');
        // Keep the stream open with keepalives until the client goes away.
        const timer = setInterval(() => res.write(JSON.stringify({ token_expires_in: 3600 }) + '\n'), 1000);
        res.on('close', () => clearInterval(timer));
      } else if (req.method === 'GET' && req.url.startsWith('/write-checkpoint2.json')) {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ data: { write_checkpoint: '1' } }));
      } else {
        res.writeHead(404);
        res.end();
      }
    });
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve({ server, port: server.address().port, requests }));
  });
}

async function phase2(dir) {
  // Good checksum: 100 + 23 = 123.
  {
    const svc = await startFakeService({ bucketChecksum: 123 });
    const agent = new Agent('phase2-good');
    await agent.call('open', { db_path: path.join(dir, 'p2.sqlite') });
    await agent.call('connect', { endpoint: `http://127.0.0.1:${svc.port}`, token: 'tok-1' });
    const synced = await agent.call('wait_first_sync', { timeout_ms: 20000 }, 30000);
    check(synced.hasSynced === true && synced.lastSyncedAt !== null, 'first sync completed against fake service');
    const rows = await agent.call('query', { sql: 'SELECT id, name, owner_id FROM lists' });
    check(rows.length === 1 && rows[0].id === 'list-1' && rows[0].name === 'Groceries', 'synced list row visible');
    const todos = await agent.call('query', { sql: 'SELECT id, completed FROM todos' });
    check(todos.length === 1 && todos[0].completed === 0, 'synced todo row visible (integer column)');
    const buckets = await agent.call('buckets');
    check(buckets.length === 1 && buckets[0].name === 'global[]' && Number(buckets[0].last_op) === 2, `buckets: ${JSON.stringify(buckets)}`);
    const st = await agent.call('status');
    check(st.connected === true && st.checksum_failures === 0, 'connected, checksum_failures == 0');
    const streamReq = svc.requests.find((r) => r.url === '/sync/stream');
    check(streamReq.headers.authorization === 'Token tok-1', 'client sent Authorization: Token <jwt>');
    await agent.call('close');
    check((await agent.end()).code === 0, 'agent exited 0');
    svc.server.closeAllConnections();
    svc.server.close();
  }
  // Bad checksum: the core rejects the checkpoint and logs "Checksums didn't match".
  {
    const svc = await startFakeService({ bucketChecksum: 999 });
    const agent = new Agent('phase2-bad');
    await agent.call('open', { db_path: path.join(dir, 'p3.sqlite') });
    await agent.call('connect', { endpoint: `http://127.0.0.1:${svc.port}`, token: 'tok-1', retry_delay_ms: 500 });
    let st;
    for (let i = 0; i < 100; i++) {
      st = await agent.call('status');
      if (st.checksum_failures > 0) break;
      await sleep(100);
    }
    check(st.checksum_failures > 0, `bad checksum counted (${st.checksum_failures}): ${st.checksum_failure_messages[0]}`);
    const rows = await agent.call('query', { sql: 'SELECT * FROM lists' });
    check(rows.length === 0, 'no rows applied from a checkpoint that failed validation');
    await agent.call('close');
    check((await agent.end()).code === 0, 'agent exited 0');
    svc.server.closeAllConnections();
    svc.server.close();
  }
}

// ---- Phase 3: sync streams against a fake edition-3 service ----
// It answers each request's `streams` part the way the PowerSync service does: the default
// stream `announcements` (`checkpoint.streams[0]`), one bucket per `project_todos` subscription
// (reason `{sub: i}`), and an error for a subscription to an unknown project.

const STREAM_ROWS = { 'announcements|0[]': [['announcements', 'a1', 1, { body: 'hello' }]] };
for (const [project, ids] of Object.entries({ p1: ['t1', 't2'], p2: ['t3'] })) {
  STREAM_ROWS[`project_todos|1["${project}"]`] = ids.map((id, i) => ['todos', id, 2 + Object.keys(STREAM_ROWS).length * 2 + i, { project_id: project }]);
}
const LAST_OP = String(Math.max(...Object.values(STREAM_ROWS).flat().map((r) => r[2])));

function streamsCheckpoint(req) {
  const after = new Map((req.buckets ?? []).map((b) => [b.name, Number(b.after)]));
  const streams = [{ name: 'announcements', is_default: true, errors: [] }];
  const buckets = [];
  const bucket = (name, priority, reason) => buckets.push({ bucket: name, checksum: 7 * STREAM_ROWS[name].length, count: STREAM_ROWS[name].length, priority, subscriptions: [reason] });
  bucket('announcements|0[]', 3, { default: 0 });
  (req.streams?.subscriptions ?? []).forEach((sub, i) => {
    if (sub.stream !== 'project_todos') return;
    if (!streams[1]) streams.push({ name: 'project_todos', is_default: false, errors: [] });
    const name = `project_todos|1["${sub.parameters?.project_id}"]`;
    if (STREAM_ROWS[name]) bucket(name, sub.override_priority ?? 3, { sub: i });
    else streams[1].errors.push({ subscription: i, message: 'no such project' });
  });
  const data = buckets.map(({ bucket: name }) => ({
    data: {
      bucket: name,
      data: STREAM_ROWS[name]
        .filter((r) => r[2] > (after.get(name) ?? 0))
        .map(([type, id, op, row]) => ({ op_id: String(op), op: 'PUT', object_type: type, object_id: id, checksum: 7, data: JSON.stringify(row) }))
    }
  }));
  return [{ checkpoint: { last_op_id: LAST_OP, write_checkpoint: null, buckets, streams } }, ...data, { checkpoint_complete: { last_op_id: LAST_OP } }];
}

function startStreamsService() {
  const bodies = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => (body += d));
    req.on('end', () => {
      if (req.url !== '/sync/stream') {
        res.writeHead(404);
        return res.end();
      }
      bodies.push(JSON.parse(body));
      res.writeHead(200, { 'content-type': 'application/x-ndjson' });
      for (const l of streamsCheckpoint(bodies.at(-1))) res.write(JSON.stringify(l) + '\n');
      const timer = setInterval(() => res.write(JSON.stringify({ token_expires_in: 3600 }) + '\n'), 1000);
      res.on('close', () => clearInterval(timer));
    });
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve({ server, port: server.address().port, bodies })));
}

async function until(what, fn, timeoutMs = 10000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) fail(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

async function phase3(dir) {
  const svc = await startStreamsService();
  const agent = new Agent('phase3');
  const schema = { todos: { project_id: 'text' }, announcements: { body: 'text' } };
  await agent.call('open', { db_path: path.join(dir, 'p4.sqlite'), schema });
  const p1 = (await agent.call('subscribe', { stream: 'project_todos', parameters: { project_id: 'p1' } })).handle;
  await agent.call('connect', { endpoint: `http://127.0.0.1:${svc.port}`, token: 'tok-1', retry_delay_ms: 200 });
  const synced = await agent.call('wait_stream_synced', { handle: p1, timeout_ms: 10000 });
  check(synced.hasSynced === true && synced.active === true && synced.hasExplicitSubscription === true, 'subscribe before connect: stream synced');
  check(/^\d{4}-/.test(synced.lastSyncedAt) && /^\d{4}-/.test(synced.expiresAt), `stream times as ISO dates: ${JSON.stringify(synced)}`);
  const sub = svc.bodies[0].streams.subscriptions;
  check(JSON.stringify(sub) === '[{"stream":"project_todos","parameters":{"project_id":"p1"},"override_priority":null}]', `request carries the subscription: ${JSON.stringify(sub)}`);
  const todos = () => agent.call('query', { sql: 'SELECT id FROM todos ORDER BY id' }).then((r) => r.map((x) => x.id).join(','));
  check((await todos()) === 't1,t2', 'p1 rows synced');
  const st = await agent.call('sync_status_streams');
  const ann = st.streams.find((s) => s.name === 'announcements');
  check(ann?.isDefault === true && ann.hasSynced === true && ann.parameters === null, `default stream reported: ${JSON.stringify(st)}`);

  // (Not ttl: 0: core 0.5.3 extends an active subscription to now + ttl and then deletes those
  // that expired before a fresh now, so a ttl-0 subscription can vanish while still in use.)
  const p2 = (await agent.call('subscribe', { stream: 'project_todos', parameters: { project_id: 'p2' }, ttl: 1, priority: 1 })).handle;
  await agent.call('wait_stream_synced', { handle: p2, timeout_ms: 10000 });
  check((await todos()) === 't1,t2,t3', 'p2 rows synced');
  check(svc.bodies.at(-1).streams.subscriptions[1].override_priority === 1, 'priority sent as override_priority');
  const bad = (await agent.call('subscribe', { stream: 'project_todos', parameters: { project_id: 'nope' } })).handle;
  await agent.call('wait_stream_synced', { handle: bad, timeout_ms: 10000 });
  const errors = (await agent.call('sync_status_streams')).errors;
  check(errors.length === 1 && /could not be resolved: no such project/.test(errors[0]), `subscription error reported: ${errors}`);
  await agent.call('unsubscribe', { handle: bad, unsubscribe_all: true });
  await until('reconnect without the bad subscription', () => svc.bodies.at(-1).streams.subscriptions.length === 2);

  // Default TTL: the subscription is still requested after unsubscribe, so its rows stay.
  const requests = svc.bodies.length;
  await agent.call('unsubscribe', { handle: p1 });
  await sleep(1500);
  check(svc.bodies.length === requests, `plain unsubscribe: no new request (${JSON.stringify(svc.bodies.slice(requests))})`);
  check((await todos()) === 't1,t2,t3', 'plain unsubscribe keeps the rows until the TTL runs out');
  // A 1 s TTL: gone at the first keepalive after it ran out.
  await agent.call('unsubscribe', { handle: p2 });
  await until('p2 rows removed after its TTL', async () => (await todos()) === 't1,t2');
  // unsubscribe_all: gone now, whatever the TTL.
  const again = (await agent.call('subscribe', { stream: 'project_todos', parameters: { project_id: 'p1' } })).handle;
  await agent.call('unsubscribe', { handle: again, unsubscribe_all: true });
  await until('p1 rows removed', async () => (await todos()) === '');
  check(svc.bodies.at(-1).streams.subscriptions.length === 0, 'no subscription requested any more');
  const bogus = await agent.send('unsubscribe', { handle: again });
  check(bogus.ok === false, 'unknown handle -> ok:false');
  await agent.call('close');
  check((await agent.end()).code === 0, 'agent exited 0');
  svc.server.closeAllConnections();
  svc.server.close();
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'node-agent-selftest-'));
try {
  await phase1(dir);
  if (process.env.SELFTEST_SKIP_FAKE_SERVICE !== '1') {
    await phase2(dir);
    await phase3(dir);
  }
} catch (e) {
  fail(e.stack ?? String(e));
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
console.error('SELFTEST PASSED');
process.exit(0);
