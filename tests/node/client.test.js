// The API as a Node service sees it: @grpc/grpc-js with the protos loaded at
// run time (@grpc/proto-loader), against a real `tether serve` on a free
// loopback port over a fresh database. Creates, transitions (verified against
// the server's own port, which is really reachable), watches, and reads the
// google.rpc.ErrorInfo of a refusal from the grpc-status-details-bin trailer.
'use strict';

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const ROOT = path.resolve(__dirname, '..', '..');
const PROTO = path.join(ROOT, 'proto');
const BIN = process.env.TETHER_BIN || path.join(ROOT, 'target', 'debug', 'tether');

const definition = protoLoader.loadSync('tether/v1/connection_service.proto', {
  includeDirs: [PROTO],
  keepCase: true,
  enums: String,
  longs: Number,
  defaults: true,
});
const { ConnectionService } = grpc.loadPackageDefinition(definition).tether.v1;

// The status details: google.rpc.Status holding Any-packed details.
const details = protobuf.loadSync([
  path.join(PROTO, 'google/rpc/status.proto'),
  path.join(PROTO, 'google/rpc/error_details.proto'),
]);
const Status = details.lookupType('google.rpc.Status');
const ErrorInfo = details.lookupType('google.rpc.ErrorInfo');

/** The ErrorInfo in an error's grpc-status-details-bin trailer. */
function errorInfo(err) {
  const [bin] = err.metadata.get('grpc-status-details-bin');
  assert.ok(bin, `no status details in ${err.message}`);
  const status = Status.decode(bin);
  const any = status.details.find((d) => d.type_url.endsWith('/google.rpc.ErrorInfo'));
  assert.ok(any, `no ErrorInfo among ${status.details.map((d) => d.type_url)}`);
  return ErrorInfo.toObject(ErrorInfo.decode(any.value));
}

let server;
let stderr = '';
let addr;
let client;
let dir;

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-node-'));
  server = spawn(
    BIN,
    ['serve', '--listen', '127.0.0.1:0', '--db', path.join(dir, 't.db'), '--disable-monitor'],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  server.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  addr = await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.once('exit', (code) => reject(new Error(`tether exited with ${code}\n${stderr}`)));
    readline.createInterface({ input: server.stdout }).once('line', (line) => {
      const m = /^tether listening on (\S+)$/.exec(line);
      if (m) resolve(m[1]);
      else reject(new Error(`unexpected first line ${line}`));
    });
  });
  client = new ConnectionService(addr, grpc.credentials.createInsecure());
});

after(async () => {
  if (client) client.close();
  if (!server) return;
  const exited = new Promise((resolve) => server.once('exit', resolve));
  server.kill('SIGTERM');
  const code = await exited;
  fs.rmSync(dir, { recursive: true, force: true });
  assert.equal(code, 0, `tether exited with ${code} after SIGTERM\n${stderr}`);
});

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

/** A connection whose url is the server's own port: a real TCP check passes. */
function reachable(name) {
  return { kind: 'tcp', url: `tcp://${addr}`, name, identity: `node:${name}:${Date.now()}` };
}

test('create, then a verified transition with the etag', async () => {
  const created = await call('CreateConnection', { connection: reachable('create') });
  assert.equal(created.state, 'CONNECTION_STATE_DISCOVERED');
  assert.match(created.id, /^[0-9a-f-]{36}$/);

  const moved = await call('TransitionConnection', {
    id: created.id,
    target_state: 'CONNECTION_STATE_REGISTERED',
    etag: created.etag,
    reason: 'checked from node',
  });
  assert.equal(moved.state, 'CONNECTION_STATE_REGISTERED');
  assert.ok(moved.revision > created.revision);

  const got = await call('GetConnection', { id: created.id });
  assert.equal(got.state, 'CONNECTION_STATE_REGISTERED');
  assert.equal(got.etag, moved.etag);
});

test('a refused transition carries ErrorInfo with the allowed targets', async () => {
  const created = await call('CreateConnection', { connection: reachable('refused') });
  const err = await call('TransitionConnection', {
    id: created.id,
    target_state: 'CONNECTION_STATE_MAINTENANCE',
  }).then(
    () => assert.fail('DISCOVERED -> MAINTENANCE was accepted'),
    (e) => e,
  );
  assert.equal(err.code, grpc.status.FAILED_PRECONDITION, err.message);
  const info = errorInfo(err);
  assert.equal(info.domain, 'tether.dev');
  assert.equal(info.reason, 'INVALID_TRANSITION');
  assert.equal(info.metadata.from, 'DISCOVERED');
  assert.equal(info.metadata.to, 'MAINTENANCE');
  assert.equal(info.metadata.id, created.id);
  assert.deepEqual(info.metadata.allowed.split(','), ['REGISTERED', 'IGNORED', 'DELETED']);
});

test('a watch sends the snapshot, SYNCED, then each change', async () => {
  const kind = 'tcp';
  const before = await call('CreateConnection', { connection: reachable('before-watch') });
  const stream = client.WatchConnections({ after_revision: 0, kinds: [kind] });
  const seen = [];
  let created;
  const done = new Promise((resolve, reject) => {
    // The live event may arrive before or after the create's answer.
    const check = () => {
      if (created && seen.some((m) => m.connection && m.connection.id === created.id)) resolve();
    };
    stream.on('error', (e) => {
      if (e.code !== grpc.status.CANCELLED) reject(e);
    });
    stream.on('data', (msg) => {
      seen.push(msg);
      if (msg.type === 'WATCH_EVENT_TYPE_SYNCED') {
        call('CreateConnection', { connection: reachable('during-watch') }).then((c) => {
          created = c;
          check();
        }, reject);
      }
      check();
    });
  });
  await done;
  stream.cancel();

  const synced = seen.findIndex((m) => m.type === 'WATCH_EVENT_TYPE_SYNCED');
  assert.ok(synced > 0, 'SYNCED follows the snapshot');
  const snapshot = seen.slice(0, synced);
  assert.ok(snapshot.every((m) => m.type === 'WATCH_EVENT_TYPE_ADDED'));
  assert.ok(snapshot.some((m) => m.connection.id === before.id), 'the snapshot holds it');
  const live = seen.find((m) => m.connection && m.connection.id === created.id);
  assert.ok(seen.indexOf(live) > synced, 'the change comes after SYNCED');
  assert.equal(live.type, 'WATCH_EVENT_TYPE_ADDED');
  assert.equal(live.revision, created.revision);
  assert.equal(live.event.to_state, 'CONNECTION_STATE_DISCOVERED');
  const revisions = seen.filter((m) => m.connection).map((m) => m.revision);
  assert.deepEqual(revisions.slice(synced), [...revisions.slice(synced)].sort((a, b) => a - b));
});
