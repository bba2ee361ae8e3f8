#!/usr/bin/env node
// ferrosync node-agent: drives a real, unmodified @powersync/node client.
//
// Protocol: one JSON command per line on stdin, exactly one JSON response line per
// command on stdout ({"id":..,"ok":true,"result":..} or {"id":..,"ok":false,"error":".."}).
// Commands are processed strictly one at a time, in order. Everything else (SDK logs,
// diagnostics) goes to stderr. The agent closes the database and exits when stdin ends.
//
// See README.md for the command list.

import path from 'node:path';
import readline from 'node:readline';
import {
  PowerSyncDatabase,
  Schema,
  Table,
  column,
  LogLevels,
  SyncStreamConnectionMethod,
  UpdateType
} from '@powersync/node';
import pg from 'pg';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';

const AGENT_DIR = path.dirname(fileURLToPath(import.meta.url));
const PACKAGE_VERSIONS = Object.fromEntries(
  ['@powersync/node', '@powersync/common', 'better-sqlite3', 'pg'].map((name) => {
    try {
      const file = path.join(AGENT_DIR, 'node_modules', name, 'package.json');
      return [name, JSON.parse(fs.readFileSync(file, 'utf8')).version];
    } catch {
      return [name, null];
    }
  })
);

// ---------------------------------------------------------------------------------------
// stdout is reserved for protocol responses. Anything that tries console.log/info/debug
// (the SDK's default console logger, libraries) is diverted to stderr.
const protocolOut = process.stdout;
for (const name of ['log', 'info', 'debug', 'trace']) {
  console[name] = (...args) => console.error(...args);
}

function jsonReplacer(_key, value) {
  if (typeof value === 'bigint') {
    return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
  }
  if (value instanceof Uint8Array) {
    return Buffer.from(value).toString('base64');
  }
  return value;
}

function respond(obj) {
  protocolOut.write(JSON.stringify(obj, jsonReplacer) + '\n');
}

// ---------------------------------------------------------------------------------------
// Logging

const LEVEL_NAMES = { 10: 'TRACE', 20: 'DEBUG', 30: 'INFO', 40: 'WARN', 50: 'ERROR' };
const envLevel = (process.env.FERROSYNC_AGENT_LOG ?? 'debug').toLowerCase();
const minLevel = LogLevels[envLevel] ?? LogLevels.debug;

// The PowerSync core extension reports a failed checkpoint validation as a LogLine
// instruction with severity WARNING and the text
//   "Checksums didn't match, failed for: <bucket list>"
// (powersync-sqlite-core, forwarded by the SDK's rustSyncIteration at LogLevels.warn).
// At trace level the SDK also echoes raw powersync_control() responses which may contain the
// same text; those are excluded so each failure is counted once.
const CHECKSUM_FAILURE_RE = /checksums? (didn't|did not|do not|don't) match|checksum (mismatch|failure|failed)/i;

// The service's per-stream errors (`checkpoint.streams[].errors`) reach the SDK only as WARN log
// lines of the core extension (SyncStatus has no field for them):
//   "Subscription to stream <name> (with parameters {...}) could not be resolved: <message>"
//   "Default subscription <name> has errors: <message>"
const STREAM_ERROR_RE = /^(Subscription to stream .* could not be resolved|Default subscription .* has errors)/;

const state = {
  db: null,
  dbPath: null,
  token: null,
  endpoint: null,
  pool: null,
  connectPromise: null,
  // Sync stream subscriptions made with `subscribe`, by handle: {stream, subscription}.
  subscriptions: new Map(),
  nextSubscriptionHandle: 1,
  checksumFailures: 0,
  checksumFailureMessages: [],
  streamErrors: [],
  credentialFetches: 0,
  uploadBatches: 0,
  uploadedOps: 0,
  uploadErrors: 0,
  lastUploadError: null,
  lastSdkError: null
};

function errorText(err) {
  if (err == null) return undefined;
  if (err instanceof Error) return err.stack ?? `${err.name}: ${err.message}`;
  if (typeof err === 'object') {
    try {
      return JSON.stringify(err, jsonReplacer);
    } catch {
      return String(err);
    }
  }
  return String(err);
}

function agentLog(level, message, error) {
  if (level < minLevel) return;
  const ts = new Date().toISOString();
  let line = `${ts} [${LEVEL_NAMES[level] ?? level}] ${message}`;
  if (error !== undefined) line += ` | ${errorText(error)}`;
  process.stderr.write(line + '\n');
}

const sdkLogger = {
  log(record) {
    const { level, message, error } = record;
    if (level > LogLevels.trace && typeof message === 'string' && CHECKSUM_FAILURE_RE.test(message)) {
      state.checksumFailures++;
      state.checksumFailureMessages.push(message);
      if (state.checksumFailureMessages.length > 20) state.checksumFailureMessages.shift();
    }
    if (typeof message === 'string' && STREAM_ERROR_RE.test(message)) {
      state.streamErrors.push(message);
      if (state.streamErrors.length > 20) state.streamErrors.shift();
    }
    if (level >= LogLevels.error) {
      state.lastSdkError = message + (error !== undefined ? `: ${errorMessage(error)}` : '');
    }
    if (level < minLevel) return;
    const ts = new Date().toISOString();
    let line = `${ts} [PowerSync ${LEVEL_NAMES[level] ?? level}] ${message}`;
    if (error !== undefined) line += ` | ${errorText(error)}`;
    process.stderr.write(line + '\n');
  }
};

function errorMessage(err) {
  if (err == null) return null;
  if (typeof err === 'object') {
    const msg = typeof err.message === 'string' ? err.message : '';
    const cause = err.cause != null ? errorMessage(err.cause) : null;
    const base = msg || err.name || err.type || String(err);
    return cause && !base.includes(cause) ? `${base} (cause: ${cause})` : base;
  }
  return String(err);
}

// ---------------------------------------------------------------------------------------
// Todo-app schema (id is implicit)

const lists = new Table({
  created_at: column.text,
  name: column.text,
  owner_id: column.text
});

const todos = new Table(
  {
    list_id: column.text,
    created_at: column.text,
    completed_at: column.text,
    description: column.text,
    completed: column.integer,
    owner_id: column.text
  },
  { indexes: { list: ['list_id'] } }
);

const AppSchema = new Schema({ lists, todos });

const COLUMN_TYPES = { text: column.text, integer: column.integer, real: column.real };

// A schema given to `open` as {<table>: {<column>: "text" | "integer" | "real"}} (id is
// implicit), for tests whose app is not the todo app: the SDK only materialises synced rows of
// tables its schema names.
function schemaFromJson(spec) {
  if (spec == null) return AppSchema;
  if (typeof spec !== 'object') throw new Error('open: schema must be an object of tables');
  const tables = {};
  for (const [table, columns] of Object.entries(spec)) {
    const cols = {};
    for (const [name, type] of Object.entries(columns ?? {})) {
      const col = COLUMN_TYPES[String(type).toLowerCase()];
      if (!col) throw new Error(`open: column ${table}.${name} has unknown type ${JSON.stringify(type)}`);
      cols[name] = col;
    }
    tables[table] = new Table(cols);
  }
  return new Schema(tables);
}

// ---------------------------------------------------------------------------------------
// Upload connector: applies ps_crud entries to the source Postgres.

function quoteIdent(name) {
  return '"' + String(name).replace(/"/g, '""') + '"';
}

function pgValue(v) {
  if (v !== null && typeof v === 'object') return JSON.stringify(v);
  return v;
}

async function applyCrudEntry(client, entry) {
  const table = quoteIdent(entry.table);
  const data = entry.opData ?? {};
  const cols = Object.keys(data).filter((c) => c !== 'id');
  switch (entry.op) {
    case UpdateType.PUT: {
      const names = ['id', ...cols].map(quoteIdent);
      const values = [entry.id, ...cols.map((c) => pgValue(data[c]))];
      const placeholders = values.map((_, i) => `$${i + 1}`);
      const conflict =
        cols.length === 0
          ? 'DO NOTHING'
          : 'DO UPDATE SET ' + cols.map((c) => `${quoteIdent(c)} = EXCLUDED.${quoteIdent(c)}`).join(', ');
      const sql = `INSERT INTO ${table} (${names.join(', ')}) VALUES (${placeholders.join(', ')}) ON CONFLICT (id) ${conflict}`;
      await client.query(sql, values);
      break;
    }
    case UpdateType.PATCH: {
      if (cols.length === 0) return;
      const sets = cols.map((c, i) => `${quoteIdent(c)} = $${i + 2}`);
      const sql = `UPDATE ${table} SET ${sets.join(', ')} WHERE id = $1`;
      await client.query(sql, [entry.id, ...cols.map((c) => pgValue(data[c]))]);
      break;
    }
    case UpdateType.DELETE: {
      await client.query(`DELETE FROM ${table} WHERE id = $1`, [entry.id]);
      break;
    }
    default:
      throw new Error(`unknown crud op ${entry.op}`);
  }
}

function makeConnector(endpoint, sourceUrl) {
  return {
    async fetchCredentials() {
      state.credentialFetches++;
      agentLog(LogLevels.debug, `fetchCredentials #${state.credentialFetches} -> ${endpoint}`);
      return { endpoint, token: state.token };
    },
    async uploadData(database) {
      if (!sourceUrl) {
        const err = new Error('uploadData: no source_url given to connect; cannot upload local writes');
        state.uploadErrors++;
        state.lastUploadError = err.message;
        throw err;
      }
      if (state.pool == null) {
        state.pool = new pg.Pool({ connectionString: sourceUrl, max: 2 });
        state.pool.on('error', (e) => agentLog(LogLevels.warn, 'pg pool error', e));
      }
      try {
        for (;;) {
          const batch = await database.getCrudBatch(100);
          if (batch == null) break;
          const client = await state.pool.connect();
          try {
            await client.query('BEGIN');
            for (const entry of batch.crud) {
              await applyCrudEntry(client, entry);
            }
            await client.query('COMMIT');
          } catch (e) {
            await client.query('ROLLBACK').catch(() => {});
            throw e;
          } finally {
            client.release();
          }
          await batch.complete();
          state.uploadBatches++;
          state.uploadedOps += batch.crud.length;
          agentLog(LogLevels.debug, `uploaded batch of ${batch.crud.length} ops (haveMore=${batch.haveMore})`);
        }
      } catch (e) {
        state.uploadErrors++;
        state.lastUploadError = errorMessage(e);
        agentLog(LogLevels.warn, 'uploadData failed', e);
        throw e;
      }
    }
  };
}

// ---------------------------------------------------------------------------------------
// Status

async function crudPending() {
  const row = await state.db.get('SELECT count(*) AS n FROM ps_crud');
  return Number(row.n);
}

function statusJson(s) {
  const progress = s.downloadProgress;
  return {
    connected: s.connected,
    connecting: s.connecting,
    hasSynced: s.hasSynced ?? null,
    lastSyncedAt: s.lastSyncedAt ? s.lastSyncedAt.toISOString() : null,
    dataFlow: {
      uploading: s.uploading,
      downloading: s.downloading,
      downloadError: errorMessage(s.downloadError),
      uploadError: errorMessage(s.uploadError)
    },
    downloadProgress: progress
      ? { downloadedOperations: progress.downloadedOperations, totalOperations: progress.totalOperations }
      : null,
    priorityStatusEntries: (s.priorityStatusEntries ?? []).map((p) => ({
      priority: p.priority,
      hasSynced: p.hasSynced ?? null,
      lastSyncedAt: p.lastSyncedAt ? p.lastSyncedAt.toISOString() : null
    }))
  };
}

async function fullStatus() {
  const db = requireDb();
  const out = statusJson(db.currentStatus);
  out.crud_pending = await crudPending();
  out.checksum_failures = state.checksumFailures;
  out.checksum_failure_messages = state.checksumFailureMessages;
  out.credential_fetches = state.credentialFetches;
  out.upload_batches = state.uploadBatches;
  out.uploaded_ops = state.uploadedOps;
  out.upload_errors = state.uploadErrors;
  out.last_upload_error = state.lastUploadError;
  out.last_sdk_error = state.lastSdkError;
  out.sdk_version = db.sdkVersion; // core extension version, e.g. 0.5.3/<hash>
  out.packages = PACKAGE_VERSIONS;
  return out;
}

// ---------------------------------------------------------------------------------------
// Sync streams

// SDK 1.1.0 builds these Dates as `new Date(core_value * 1000)`, i.e. it reads seconds, but
// core 0.5.3 reports stream timestamps in microseconds, so the Date is out of range and
// toISOString() throws "Invalid time value". Read the core's number as microseconds then.
function streamTime(date, raw) {
  if (date == null) return null;
  if (!Number.isNaN(date.getTime())) return date.toISOString();
  return typeof raw === 'number' ? new Date(raw / 1000).toISOString() : null;
}

// What SyncStatus reports for one stream subscription (the core extension's view, built from
// the service's `checkpoint.streams` and each bucket's `subscriptions`).
function streamStatusJson(s) {
  const sub = s.subscription;
  const core = s.core ?? {};
  return {
    name: sub.name,
    parameters: sub.parameters,
    active: sub.active,
    isDefault: sub.isDefault,
    hasExplicitSubscription: sub.hasExplicitSubscription,
    expiresAt: streamTime(sub.expiresAt, core.expires_at),
    hasSynced: sub.hasSynced,
    lastSyncedAt: streamTime(sub.lastSyncedAt, core.last_synced_at),
    priority: s.priority ?? null,
    progress: s.progress
  };
}

function requireSubscription(cmd) {
  const entry = state.subscriptions.get(cmd.handle);
  if (!entry) throw new Error(`${cmd.cmd}: no subscription with handle ${JSON.stringify(cmd.handle)}`);
  return entry;
}

function streamSynced(db, entry) {
  const desc = { name: entry.subscription.name, parameters: entry.subscription.parameters };
  return db.currentStatus.forStream(desc)?.subscription.hasSynced === true;
}

// Drop every handle (at close): a leaked handle only logs a warning, but the next `open` must not
// see handles of a closed database.
function forgetSubscriptions() {
  for (const { subscription } of state.subscriptions.values()) subscription.unsubscribe();
  state.subscriptions.clear();
}

// ---------------------------------------------------------------------------------------
// Commands

function requireDb() {
  if (!state.db) throw new Error('database not open (send "open" first)');
  return state.db;
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

function connectionMethodOf(name) {
  switch ((name ?? 'http').toLowerCase()) {
    case 'http':
      return SyncStreamConnectionMethod.HTTP;
    case 'websocket':
    case 'web-socket':
    case 'web_socket':
    case 'ws':
      return SyncStreamConnectionMethod.WEB_SOCKET;
    default:
      throw new Error(`unknown connection_method ${JSON.stringify(name)} (use "http" or "websocket")`);
  }
}

async function closePool() {
  const pool = state.pool;
  state.pool = null;
  if (pool) await pool.end().catch((e) => agentLog(LogLevels.warn, 'pg pool end failed', e));
}

const handlers = {
  async open(cmd) {
    if (state.db) throw new Error(`database already open at ${state.dbPath}`);
    if (!cmd.db_path) throw new Error('open: db_path is required');
    const abs = path.resolve(cmd.db_path);
    const db = new PowerSyncDatabase({
      schema: schemaFromJson(cmd.schema),
      database: {
        dbFilename: path.basename(abs),
        dbLocation: path.dirname(abs),
        ...(cmd.read_worker_count ? { readWorkerCount: cmd.read_worker_count } : {})
      },
      logger: sdkLogger
    });
    db.registerListener({
      statusChanged: (s) => agentLog(LogLevels.debug, `status: ${JSON.stringify(statusJson(s))}`)
    });
    await db.init();
    state.db = db;
    state.dbPath = abs;
    return { db_path: abs, sdk_version: db.sdkVersion, packages: PACKAGE_VERSIONS, client_id: await db.getClientId() };
  },

  async connect(cmd) {
    const db = requireDb();
    if (!cmd.endpoint) throw new Error('connect: endpoint is required');
    if (cmd.token !== undefined) state.token = cmd.token;
    state.endpoint = cmd.endpoint;
    const options = { connectionMethod: connectionMethodOf(cmd.connection_method) };
    // Optional pass-through SyncOptions (useful for tests).
    if (cmd.params !== undefined) options.params = cmd.params;
    if (cmd.app_metadata !== undefined) options.appMetadata = cmd.app_metadata;
    if (cmd.retry_delay_ms !== undefined) options.retryDelayMs = cmd.retry_delay_ms;
    if (cmd.crud_upload_throttle_ms !== undefined) options.crudUploadThrottleMs = cmd.crud_upload_throttle_ms;
    if (cmd.include_default_streams !== undefined) options.includeDefaultStreams = cmd.include_default_streams;
    if (cmd.checkpoint_mode !== undefined) options.checkpointMode = cmd.checkpoint_mode;
    if (cmd.fetch_strategy !== undefined) options.fetchStrategy = cmd.fetch_strategy;
    await closePool();
    const connector = makeConnector(cmd.endpoint, cmd.source_url ?? null);
    // db.connect() only resolves once a connection is established (it never resolves while the
    // endpoint is unreachable), so it is not awaited here.
    state.connectPromise = db.connect(connector, options).then(
      () => agentLog(LogLevels.debug, 'db.connect() resolved'),
      (e) => agentLog(LogLevels.warn, 'db.connect() rejected', e)
    );
    return { connection_method: options.connectionMethod };
  },

  async set_token(cmd) {
    if (typeof cmd.token !== 'string') throw new Error('set_token: token (string) is required');
    state.token = cmd.token;
    return null;
  },

  async wait_first_sync(cmd) {
    const db = requireDb();
    const timeoutMs = cmd.timeout_ms ?? 30000;
    const signal = AbortSignal.timeout(timeoutMs);
    // With an abort signal, waitForFirstSync resolves (not rejects) on abort: re-check after.
    await db.waitForFirstSync(cmd.priority !== undefined ? { signal, priority: cmd.priority } : signal);
    const s = db.currentStatus;
    const done = cmd.priority !== undefined ? s.statusForPriority(cmd.priority)?.hasSynced : s.hasSynced;
    if (!done) {
      throw new Error(`wait_first_sync timed out after ${timeoutMs} ms; status: ${JSON.stringify(await fullStatus())}`);
    }
    return statusJson(s);
  },

  async query(cmd) {
    const db = requireDb();
    if (!cmd.sql) throw new Error('query: sql is required');
    return await db.getAll(cmd.sql, cmd.params ?? []);
  },

  async execute(cmd) {
    const db = requireDb();
    if (!cmd.sql) throw new Error('execute: sql is required');
    const r = await db.execute(cmd.sql, cmd.params ?? []);
    return { rowsAffected: r.rowsAffected ?? 0, rows: r.rows?._array ?? [] };
  },

  async status() {
    return await fullStatus();
  },

  async wait_upload_done(cmd) {
    const db = requireDb();
    const timeoutMs = cmd.timeout_ms ?? 30000;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const pending = await crudPending();
      if (pending === 0 && !db.currentStatus.uploading) return { crud_pending: 0 };
      if (Date.now() >= deadline) {
        throw new Error(
          `wait_upload_done timed out after ${timeoutMs} ms; status: ${JSON.stringify(await fullStatus())}`
        );
      }
      await sleep(50);
    }
  },

  async buckets(cmd) {
    const db = requireDb();
    // powersync-sqlite-core 0.5.3: ps_buckets(id, name, last_applied_op, last_op, add_checksum,
    // op_checksum, pending_delete, count_at_last, count_since_last, downloaded_size).
    // The '$local' pseudo-bucket (local-write bookkeeping) is skipped unless include_local is set.
    const where = cmd.include_local ? '' : "WHERE name != '$local'";
    return await db.getAll(
      `SELECT name, last_op, last_applied_op, count_at_last, count_since_last FROM ps_buckets ${where} ORDER BY name`
    );
  },

  async subscribe(cmd) {
    const db = requireDb();
    if (typeof cmd.stream !== 'string') throw new Error('subscribe: stream (string) is required');
    const options = {};
    if (cmd.ttl !== undefined) options.ttl = cmd.ttl;
    if (cmd.priority !== undefined) options.priority = cmd.priority;
    // Works connected or not: the subscription is stored in ps_stream_subscriptions and, while
    // connected, the SDK restarts the sync stream with the new subscription list.
    const stream = db.syncStream(cmd.stream, cmd.parameters ?? null);
    const subscription = await stream.subscribe(options);
    const handle = state.nextSubscriptionHandle++;
    state.subscriptions.set(handle, { stream, subscription });
    return { handle, stream: subscription.name, parameters: subscription.parameters };
  },

  async unsubscribe(cmd) {
    requireDb();
    const { stream, subscription } = requireSubscription(cmd);
    state.subscriptions.delete(cmd.handle);
    subscription.unsubscribe();
    // unsubscribe() alone keeps requesting the stream until its TTL (default one day) runs out;
    // unsubscribeAll() drops the stored subscription, so the next request leaves it out and the
    // service stops sending (and the client deletes) its buckets now.
    if (cmd.unsubscribe_all) await stream.unsubscribeAll();
    return null;
  },

  async wait_stream_synced(cmd) {
    const db = requireDb();
    const entry = requireSubscription(cmd);
    const timeoutMs = cmd.timeout_ms ?? 30000;
    // Like waitForFirstSync, this resolves (not rejects) on abort: re-check after.
    await entry.subscription.waitForFirstSync(AbortSignal.timeout(timeoutMs));
    if (!streamSynced(db, entry)) {
      const streams = (db.currentStatus.syncStreams ?? []).map(streamStatusJson);
      throw new Error(
        `wait_stream_synced timed out after ${timeoutMs} ms; streams: ${JSON.stringify(streams)}; status: ${JSON.stringify(await fullStatus())}`
      );
    }
    return streamStatusJson(db.currentStatus.forStream(entry.subscription));
  },

  async sync_status_streams() {
    const db = requireDb();
    const streams = db.currentStatus.syncStreams;
    return { streams: streams == null ? null : streams.map(streamStatusJson), errors: state.streamErrors };
  },

  async disconnect() {
    const db = requireDb();
    await db.disconnect();
    await closePool();
    return null;
  },

  async close() {
    const db = requireDb();
    forgetSubscriptions();
    await db.close();
    await closePool();
    state.db = null;
    state.dbPath = null;
    return null;
  }
};

async function handleLine(line) {
  const trimmed = line.trim();
  if (!trimmed) return;
  let cmd;
  try {
    cmd = JSON.parse(trimmed);
  } catch (e) {
    respond({ id: null, ok: false, error: `invalid JSON: ${e.message}` });
    return;
  }
  const id = cmd?.id ?? null;
  const handler = typeof cmd?.cmd === 'string' && Object.hasOwn(handlers, cmd.cmd) ? handlers[cmd.cmd] : null;
  if (!handler) {
    respond({ id, ok: false, error: `unknown cmd ${JSON.stringify(cmd?.cmd)}` });
    return;
  }
  agentLog(LogLevels.debug, `-> ${cmd.cmd} (id=${id})`);
  try {
    const result = await handler(cmd);
    respond({ id, ok: true, result: result ?? null });
  } catch (e) {
    agentLog(LogLevels.debug, `command ${cmd.cmd} failed`, e);
    respond({ id, ok: false, error: errorMessage(e) ?? 'unknown error' });
  }
}

async function shutdown(code) {
  // Closing can hang on a sync loop retrying against a dead server: never outlive this.
  setTimeout(() => process.exit(code), 5000).unref();
  try {
    if (state.db) {
      await state.db.close();
      state.db = null;
    }
  } catch (e) {
    agentLog(LogLevels.error, 'error closing database at shutdown', e);
    code = code || 1;
  }
  await closePool();
  // Flush stdout before exiting.
  protocolOut.write('', () => process.exit(code));
}

// An orphaned agent (its test process died) must not spin writing into a broken pipe.
process.stdout.on('error', () => process.exit(1));
setInterval(() => {
  if (process.ppid === 1) shutdown(1);
}, 1000).unref();
process.on('unhandledRejection', (e) => agentLog(LogLevels.error, 'unhandled rejection', e));
process.on('uncaughtException', (e) => agentLog(LogLevels.error, 'uncaught exception', e));
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    agentLog(LogLevels.info, `received ${sig}, closing`);
    shutdown(0);
  });
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity, terminal: false });
for await (const line of rl) {
  await handleLine(line);
}
agentLog(LogLevels.info, 'stdin closed, shutting down');
await shutdown(0);
