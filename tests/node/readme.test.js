// The README's Node example runs as pasted and prints what the README says it
// prints: it is taken from the README's "### Node" section, run from the
// repository's root (as the README says) against a fresh `tether serve` on a
// free loopback port, with the packages of this folder.
'use strict';

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { spawn, execFile } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const ROOT = path.resolve(__dirname, '..', '..');
const BIN = process.env.TETHER_BIN || path.join(ROOT, 'target', 'debug', 'tether');
const README_ADDR = '127.0.0.1:50051';

/** The text under `### Node` of the README's Clients section. */
function nodeSection() {
  const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');
  const clients = readme.split('\n## Clients\n')[1].split('\n## ')[0];
  return clients.split('\n### Node\n')[1].split('\n### ')[0];
}

function block(text, lang) {
  const found = [...text.matchAll(new RegExp('```' + lang + '\\n([\\s\\S]*?)```', 'g'))];
  assert.equal(found.length, 1, `one ${lang} block under ### Node`);
  return found[0][1];
}

const lines = (text) => text.split('\n').map((l) => l.trimEnd()).filter((l, i, all) => l || i < all.length - 1);

test('the README Node example runs as pasted', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-readme-'));
  const server = spawn(BIN, ['serve', '--listen', '127.0.0.1:0', '--db', path.join(dir, 't.db')], {
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  t.after(() => {
    server.kill('SIGTERM');
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const addr = await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.once('exit', (code) => reject(new Error(`tether exited with ${code}`)));
    readline.createInterface({ input: server.stdout }).once('line', (line) => {
      const m = /^tether listening on (\S+)$/.exec(line);
      if (m) resolve(m[1]);
      else reject(new Error(`unexpected first line ${line}`));
    });
  });

  const text = nodeSection();
  const script = path.join(dir, 'client.js');
  fs.writeFileSync(script, block(text, 'javascript').replaceAll(README_ADDR, addr));
  const stdout = await new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      [script],
      { cwd: ROOT, timeout: 60_000, env: { ...process.env, NODE_PATH: path.join(__dirname, 'node_modules') } },
      (err, out, stderr) => (err ? reject(new Error(`${err.message}\n${stderr}`)) : resolve(out)),
    );
  });
  assert.deepEqual(lines(stdout), lines(block(text, 'text')));
});
