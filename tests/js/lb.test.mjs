// Two gateways behind a real HAProxy (Debian package) on loopback. With cookie affinity,
// socket.io-client works over HTTP long-polling and over polling upgraded to WebSocket; with
// plain round robin, long-polling fails, as it must (each poll may land on the other
// gateway, which does not know the session). The second half keeps the first honest.
// Last, scripts/run-local.sh (the container-free topology) is started and used through its
// own HAProxy, with docs/API.md's snippet as printed; and it refuses to start on a port
// another process holds.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { io } from 'socket.io-client';
import { startTopology, register, createRoom, once } from './harness.mjs';

let topology;
const balancers = [];
const dir = mkdtempSync(path.join(tmpdir(), 'chat-lb-'));

function freePort() {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Starts HAProxy in front of both gateways; `sticky` adds cookie affinity. */
async function haproxy(sticky) {
  const port = await freePort();
  const [g1, g2] = topology.gateways;
  const config = `
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
frontend chat
  bind 127.0.0.1:${port}
  default_backend gateways
backend gateways
  balance roundrobin
  ${sticky ? 'cookie CHATSRV insert indirect nocache httponly' : ''}
  server g1 127.0.0.1:${g1.port} ${sticky ? 'cookie g1' : ''}
  server g2 127.0.0.1:${g2.port} ${sticky ? 'cookie g2' : ''}
`;
  const file = path.join(dir, `haproxy-${port}.cfg`);
  writeFileSync(file, config);
  const child = spawn(process.env.HAPROXY || 'haproxy', ['-f', file, '-db'], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  balancers.push(child);
  // Ready when it accepts connections.
  for (let i = 0; ; i++) {
    try {
      await new Promise((resolve, reject) => {
        const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(); });
        s.once('error', reject);
      });
      break;
    } catch (error) {
      if (i > 200 || child.exitCode !== null) throw new Error(`haproxy did not start: ${error.message}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }
  return `http://127.0.0.1:${port}`;
}

before(async () => {
  topology = await startTopology();
});

after(async () => {
  for (const child of balancers) child.kill('SIGTERM');
  await topology?.stop();
  rmSync(dir, { recursive: true, force: true });
});

async function chatThrough(url, transports, token, roomId) {
  // withCredentials: the Node client keeps the balancer's affinity cookie.
  const socket = io(`${url}/chat`, {
    transports, auth: { token }, withCredentials: true, reconnection: false,
  });
  try {
    await new Promise((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('connect_error', (e) => reject(new Error(`connect_error: ${e.message}`)));
      socket.once('disconnect', (reason) => reject(new Error(`disconnect: ${reason}`)));
    });
    const joined = await socket.timeout(10_000).emitWithAck('join_room', { roomId });
    assert.equal(joined.ok, true);
    // Several round trips on the same session.
    for (let i = 0; i < 5; i++) {
      const content = `via ${transports.join('+')} #${i}`;
      const received = once(socket, 'message');
      const ack = await socket.timeout(10_000).emitWithAck('send_message', { roomId, content });
      assert.equal(ack.ok, true);
      assert.equal((await received).content, content);
    }
    return socket.io.engine.transport.name;
  } finally {
    socket.close();
  }
}

test('with cookie affinity, polling and polling upgraded to WebSocket work through HAProxy', async () => {
  const base = topology.gateways[0].url;
  const ann = await register(base, 'lb-ann');
  const room = await createRoom(base, ann.accessToken, []);
  const url = await haproxy(true);
  assert.equal(await chatThrough(url, ['polling'], ann.accessToken, room._id), 'polling');
  assert.equal(
    await chatThrough(url, ['polling', 'websocket'], ann.accessToken, room._id),
    'websocket',
  );
});

test('without affinity, long-polling fails (so the test above can fail)', async () => {
  const base = topology.gateways[0].url;
  const bob = await register(base, 'lb-bob');
  const room = await createRoom(base, bob.accessToken, []);
  const url = await haproxy(false);
  // The second request of the session reaches the other gateway, which answers 400
  // "Session ID unknown": the client sees a transport error, not a timeout.
  const started = Date.now();
  await assert.rejects(
    () => chatThrough(url, ['polling'], bob.accessToken, room._id),
    /connect_error|disconnect: transport/,
  );
  assert.ok(Date.now() - started < 5000, 'failed fast, not by a timeout');
});

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../..');

/** Starts scripts/run-local.sh on free ports (or those `given`); its output is collected. */
async function runLocal(given = {}) {
  const ports = {};
  for (const name of ['LB_PORT', 'REDIS_PORT', 'MONGO_PORT', 'PERSISTER_ADMIN_PORT', 'g1', 'g2', 'a1', 'a2']) {
    ports[name] = given[name] ?? await freePort();
  }
  const child = spawn(path.join(root, 'scripts/run-local.sh'), [], {
    env: {
      ...process.env,
      RUST_LOG: 'warn',
      BIN_DIR: path.join(root, 'target', process.env.CARGO_PROFILE_DIR || 'debug'),
      DATA_DIR: path.join(dir, 'local'),
      LB_PORT: String(ports.LB_PORT),
      REDIS_PORT: String(ports.REDIS_PORT),
      MONGO_PORT: String(ports.MONGO_PORT),
      PERSISTER_ADMIN_PORT: String(ports.PERSISTER_ADMIN_PORT),
      GATEWAY_PORTS: `${ports.g1} ${ports.g2}`,
      GATEWAY_ADMIN_PORTS: `${ports.a1} ${ports.a2}`,
      JWT_SECRET: 'run-local-test-secret-of-32-bytes-or-more',
      REDIS_URL: '',
      MONGODB_URI: '',
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const output = { stdout: '', stderr: '' };
  child.stdout.on('data', (chunk) => { output.stdout += chunk; });
  child.stderr.on('data', (chunk) => { output.stderr += chunk; process.stderr.write(chunk); });
  /** Resolves on its "ready:" line; rejects when it exits first. */
  const ready = () => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('run-local.sh not ready in 60 s')), 60_000);
    const check = () => {
      if (output.stdout.includes('ready:')) { clearTimeout(timer); resolve(); }
    };
    child.stdout.on('data', check);
    check();
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`run-local.sh exited with ${code}`)); });
  });
  return { child, ports, output, ready };
}

/** docs/API.md's first JavaScript snippet, as printed, with its URL pointed at `url`. */
async function apiSnippet(url, accessToken) {
  const doc = readFileSync(path.join(root, 'docs/API.md'), 'utf8');
  const code = doc.match(/```javascript\n([\s\S]*?)```/)[1];
  assert.ok(code.includes("'http://localhost:3000/chat'"), 'the snippet names the URL the test replaces');
  // Beside node_modules, so that its import resolves as a user's would.
  const file = path.join(root, 'tests/js', `.api-snippet-${process.pid}.mjs`);
  writeFileSync(file, `const accessToken = ${JSON.stringify(accessToken)};\n`
    + code.replaceAll('http://localhost:3000', url)
    + '\nsocket.io.reconnection(false);\nexport default socket;\n');
  try {
    return (await import(file)).default;
  } finally {
    rmSync(file);
  }
}

test('scripts/run-local.sh starts the whole topology behind its load balancer, and the API snippet works through it', async () => {
  const { child, ports, ready } = await runLocal();
  try {
    await ready();
    const url = `http://127.0.0.1:${ports.LB_PORT}`;
    const ann = await register(url, 'local-ann');
    const room = await createRoom(url, ann.accessToken, []);
    assert.equal(await chatThrough(url, ['polling'], ann.accessToken, room._id), 'polling');
    // docs/API.md's snippet: polling first, then the upgrade, through the sticky balancer.
    const socket = await apiSnippet(url, ann.accessToken);
    try {
      const errors = [];
      socket.io.on('error', (e) => errors.push(`error: ${e.message}`));
      socket.on('disconnect', (reason) => errors.push(`disconnect: ${reason}`));
      if (!socket.connected) await once(socket, 'connect');
      const joined = await socket.timeout(10_000).emitWithAck('join_room', { roomId: room._id });
      assert.equal(joined.ok, true);
      for (let i = 0; i < 5; i++) {
        const received = once(socket, 'message');
        const ack = await socket.timeout(10_000).emitWithAck('send_message', { roomId: room._id, content: `snippet #${i}` });
        assert.equal(ack.ok, true);
        assert.equal((await received).content, `snippet #${i}`);
      }
      assert.equal(socket.connected, true);
      assert.deepEqual(errors, []);
    } finally {
      socket.close();
    }
  } finally {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    }
  }
  // Everything it started is gone: nothing answers on its ports any more.
  for (const port of [ports.LB_PORT, ports.g1, ports.g2, ports.REDIS_PORT, ports.MONGO_PORT]) {
    const open = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
      s.once('error', () => resolve(false));
    });
    assert.equal(open, false, `port ${port} still open after SIGTERM`);
  }
});

test('scripts/run-local.sh refuses to start when its balancer\'s port is taken, rather than say ready', async () => {
  // Another process on the balancer's port: HAProxy could not bind it, and the script's
  // wait for the port would succeed on the other listener.
  const squatter = net.createServer((s) => s.destroy());
  const port = await freePort();
  await new Promise((resolve) => squatter.listen(port, '127.0.0.1', resolve));
  try {
    const { child, output } = await runLocal({ LB_PORT: port });
    const code = await new Promise((r) => child.once('exit', r));
    assert.notEqual(code, 0);
    assert.ok(!output.stdout.includes('ready:'), output.stdout);
    assert.match(output.stderr, /LB_PORT/);
  } finally {
    squatter.close();
  }
});
