// Starts the real topology for the JavaScript suite: redis-server, SecantusDB, one
// persister and two gateways (the workspace's debug binaries), each on a free port.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const bin = (name) => path.join(root, 'target', process.env.CARGO_PROFILE_DIR || 'debug', name);
export const JWT_SECRET = 'js-suite-secret';

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function waitForPort(port, name, child, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const attempt = () => {
      if (child.exitCode !== null) return reject(new Error(`${name} exited with ${child.exitCode}`));
      const sock = net.connect(port, '127.0.0.1');
      sock.once('connect', () => { sock.destroy(); resolve(); });
      sock.once('error', () => {
        sock.destroy();
        if (Date.now() > deadline) reject(new Error(`${name} did not listen on ${port}`));
        else setTimeout(attempt, 25);
      });
    };
    attempt();
  });
}

async function waitReady(adminPort, name, child, timeoutMs = 30000) {
  await waitForPort(adminPort, name, child, timeoutMs);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const res = await fetch(`http://127.0.0.1:${adminPort}/readyz`);
      if (res.ok) return;
    } catch { /* not yet */ }
    if (Date.now() > deadline) throw new Error(`${name} not ready`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export const EMBEDDED = process.env.CHAT_MODE === 'embedded';

export async function startTopology() {
  const children = [];
  const start = (name, cmd, args, env = {}) => {
    const child = spawn(cmd, args, {
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn', ...env },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    children.push(child);
    return child;
  };
  if (EMBEDDED) return startEmbedded(children, start);
  const redisPort = await freePort();
  const redis = start('redis', process.env.REDIS_SERVER || 'redis-server', [
    '--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
  ]);
  const mongoPort = await freePort();
  const mongo = start('secantusd', process.env.SECANTUSD || path.join(root, '.venv/bin/secantusd-py'), [
    '--host', '127.0.0.1', '--port', String(mongoPort), '--storage-path', ':memory:', '--log-level', 'WARNING',
  ]);
  await Promise.all([waitForPort(redisPort, 'redis', redis), waitForPort(mongoPort, 'secantusd', mongo)]);

  const common = {
    REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    REDIS_PREFIX: `js${process.pid}`,
    MONGODB_URI: `mongodb://127.0.0.1:${mongoPort}`,
    MONGODB_DB: `js${process.pid}`,
    HOST: '127.0.0.1',
  };
  const persisterAdmin = await freePort();
  const persister = start('persister', bin('persister'), [], { ...common, METRICS_PORT: String(persisterAdmin) });
  const gateways = [];
  for (let i = 0; i < 2; i++) {
    const port = await freePort();
    const admin = await freePort();
    const child = start(`gateway${i}`, bin('gateway'), [], {
      ...common, PORT: String(port), METRICS_PORT: String(admin), JWT_SECRET,
    });
    gateways.push({ port, admin, child, url: `http://127.0.0.1:${port}` });
  }
  await Promise.all([
    waitReady(persisterAdmin, 'persister', persister),
    ...gateways.map((g, i) => waitReady(g.admin, `gateway${i}`, g.child)),
  ]);

  return {
    gateways,
    stop: () => stopAll(children),
  };
}

/** One gateway in the embedded mode (the whole server in one process); "both gateways" are
 * that one. */
export async function startEmbedded(children = [], start = null) {
  start ??= (name, cmd, args, env = {}) => {
    const child = spawn(cmd, args, {
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn', ...env },
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    children.push(child);
    return child;
  };
  const dataDir = mkdtempSync(path.join(tmpdir(), 'chat-js-'));
  const port = await freePort();
  const admin = await freePort();
  const child = start('gateway', bin('gateway'), ['--embedded', '--data-dir', dataDir], {
    PORT: String(port), METRICS_PORT: String(admin), JWT_SECRET, HOST: '127.0.0.1',
    REDIS_URL: '', MONGODB_URI: '',
  });
  await waitReady(admin, 'gateway', child);
  const g = { port, admin, child, url: `http://127.0.0.1:${port}` };
  return {
    gateways: [g, g],
    async stop() {
      await stopAll(children);
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

async function stopAll(children) {
  for (const child of children.reverse()) {
    if (child.exitCode === null) {
      child.kill('SIGTERM');
      await new Promise((r) => {
        const t = setTimeout(() => { child.kill('SIGKILL'); r(); }, 5000);
        child.once('exit', () => { clearTimeout(t); r(); });
      });
    }
  }
}

let counter = 0;
export async function register(baseUrl, name) {
  const email = `${name}-${process.pid}-${counter++}@example.com`;
  const res = await fetch(`${baseUrl}/auth/register`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ email, password: 'password123', displayName: name }),
  });
  if (res.status !== 201) throw new Error(`register: ${res.status} ${await res.text()}`);
  return res.json();
}

export async function createRoom(baseUrl, token, participantIds) {
  const res = await fetch(`${baseUrl}/chat/rooms`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ name: 'js', participantIds }),
  });
  if (res.status !== 201) throw new Error(`create room: ${res.status} ${await res.text()}`);
  return res.json();
}

/** Resolves with the next `event` on `socket`, or rejects after `ms`. */
export function once(socket, event, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
    socket.once(event, (payload) => { clearTimeout(timer); resolve(payload); });
  });
}
