// Starts the real topology for the JavaScript suite: redis-server, SecantusDB, one
// persister and two gateways (the workspace's debug binaries), each on a free port.
// CHAT_REDIS=cluster: a Redis Cluster of 3 masters and 3 replicas, and 3 persisters.
import { execFile, spawn } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const bin = (name) => path.join(root, 'target', process.env.CARGO_PROFILE_DIR || 'debug', name);
export const JWT_SECRET = 'js-suite-secret-of-32-bytes-or-more';
/** The server API key of every gateway the suite starts. */
export const SERVER_API_KEY = 'js-suite-server-api-key-of-32-bytes-or-more';

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
export const CLUSTER = process.env.CHAT_REDIS === 'cluster';

/** Six cluster-enabled redis-server nodes joined as 3 masters and 3 replicas; the URL. */
async function startCluster(start, dirs) {
  const ports = [];
  for (let i = 0; i < 6; i++) {
    const port = await freePort();
    // The bus port too: by default Redis takes port + 10000, which may be taken or too high.
    const busPort = await freePort();
    const dir = mkdtempSync(path.join(tmpdir(), 'chat-js-redis-'));
    dirs.push(dir);
    const node = start(`redis${i}`, process.env.REDIS_SERVER || 'redis-server', [
      '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf', '--dir', dir,
      '--cluster-port', String(busPort),
    ]);
    await waitForPort(port, `redis${i}`, node);
    ports.push(port);
  }
  await promisify(execFile)('redis-cli', [
    '--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`),
    '--cluster-replicas', '1', '--cluster-yes',
  ]);
  // Every node sees the cluster as ok before anything connects.
  const deadline = Date.now() + 30000;
  for (const port of ports) {
    for (;;) {
      const { stdout } = await promisify(execFile)('redis-cli', ['-p', String(port), 'CLUSTER', 'INFO']);
      if (stdout.includes('cluster_state:ok')) break;
      if (Date.now() > deadline) throw new Error('the Redis Cluster did not become ok');
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return `redis-cluster://127.0.0.1:${ports[0]}?node=127.0.0.1:${ports[1]}&node=127.0.0.1:${ports[2]}`;
}

/** With `CHAT_URL` (a running deployment, such as the compose topology of
 * deploy/images.sh behind its HAProxy), that address stands for both gateways and nothing
 * is started. */
export async function startTopology() {
  if (process.env.CHAT_URL) {
    const g = { url: process.env.CHAT_URL.replace(/\/$/, '') };
    return { gateways: [g, g], async stop() {} };
  }
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
  const dirs = [];
  let redisUrl;
  let redisReady = Promise.resolve();
  if (CLUSTER) {
    redisUrl = await startCluster(start, dirs);
  } else {
    const redisPort = await freePort();
    const redis = start('redis', process.env.REDIS_SERVER || 'redis-server', [
      '--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
    ]);
    redisUrl = `redis://127.0.0.1:${redisPort}`;
    redisReady = waitForPort(redisPort, 'redis', redis);
  }
  const mongoPort = await freePort();
  const mongo = start('secantusd', process.env.SECANTUSD || path.join(root, '.venv/bin/secantusd-py'), [
    '--host', '127.0.0.1', '--port', String(mongoPort), '--storage-path', ':memory:', '--log-level', 'WARNING',
  ]);
  await Promise.all([redisReady, waitForPort(mongoPort, 'secantusd', mongo)]);

  const common = {
    REDIS_URL: redisUrl,
    REDIS_PREFIX: `js${process.pid}`,
    MONGODB_URI: `mongodb://127.0.0.1:${mongoPort}`,
    MONGODB_DB: `js${process.pid}`,
    HOST: '127.0.0.1',
  };
  // Three persisters on a cluster (every tier scaled out), one otherwise.
  const persisters = [];
  for (let i = 0; i < (CLUSTER ? 3 : 1); i++) {
    const admin = await freePort();
    persisters.push({ admin, child: start(`persister${i}`, bin('persister'), [], { ...common, METRICS_PORT: String(admin) }) });
  }
  const gateways = [];
  for (let i = 0; i < 2; i++) {
    const port = await freePort();
    const admin = await freePort();
    const child = start(`gateway${i}`, bin('gateway'), [], {
      ...common, PORT: String(port), METRICS_PORT: String(admin), JWT_SECRET, SERVER_API_KEY,
    });
    gateways.push({ port, admin, child, url: `http://127.0.0.1:${port}` });
  }
  await Promise.all([
    ...persisters.map((p, i) => waitReady(p.admin, `persister${i}`, p.child)),
    ...gateways.map((g, i) => waitReady(g.admin, `gateway${i}`, g.child)),
  ]);

  return {
    gateways,
    async stop() {
      await stopAll(children);
      for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
    },
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
  const launch = async () => {
    const child = start('gateway', bin('gateway'), ['--embedded', '--data-dir', dataDir], {
      PORT: String(port), METRICS_PORT: String(admin), JWT_SECRET, HOST: '127.0.0.1',
      REDIS_URL: '', MONGODB_URI: '', SERVER_API_KEY,
    });
    await waitReady(admin, 'gateway', child);
    return child;
  };
  const g = { port, admin, child: await launch(), url: `http://127.0.0.1:${port}` };
  return {
    gateways: [g, g],
    /** Stops the server (SIGTERM) and starts it again on the same port and data. */
    async restart() {
      const old = g.child;
      const exited = new Promise((r) => old.once('exit', r));
      old.kill('SIGTERM');
      await exited;
      g.child = await launch();
    },
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
