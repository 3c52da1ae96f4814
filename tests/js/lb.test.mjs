// Two gateways behind a real HAProxy (Debian package) on loopback. With cookie affinity,
// socket.io-client works over HTTP long-polling and over polling upgraded to WebSocket; with
// plain round robin, long-polling fails, as it must (each poll may land on the other
// gateway, which does not know the session). The second half keeps the first honest.
// Last, scripts/run-local.sh (the container-free topology) is started and used through its
// own HAProxy.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync } from 'node:fs';
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

test('scripts/run-local.sh starts the whole topology behind its load balancer', async () => {
  const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../..');
  const ports = {};
  for (const name of ['LB_PORT', 'REDIS_PORT', 'MONGO_PORT', 'PERSISTER_ADMIN_PORT', 'g1', 'g2', 'a1', 'a2']) {
    ports[name] = await freePort();
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
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  try {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('run-local.sh not ready in 60 s')), 60_000);
      child.stdout.on('data', (chunk) => {
        if (String(chunk).includes('ready:')) { clearTimeout(timer); resolve(); }
      });
      child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`run-local.sh exited with ${code}`)); });
    });
    const url = `http://127.0.0.1:${ports.LB_PORT}`;
    const ann = await register(url, 'local-ann');
    const room = await createRoom(url, ann.accessToken, []);
    assert.equal(await chatThrough(url, ['polling'], ann.accessToken, room._id), 'polling');
  } finally {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
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
