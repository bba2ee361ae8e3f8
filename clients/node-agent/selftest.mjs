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

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'node-agent-selftest-'));
try {
  await phase1(dir);
  if (process.env.SELFTEST_SKIP_FAKE_SERVICE !== '1') await phase2(dir);
} catch (e) {
  fail(e.stack ?? String(e));
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
console.error('SELFTEST PASSED');
process.exit(0);
