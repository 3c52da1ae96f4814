// The seed's WebSocket API, exercised with the official socket.io-client. Every event and
// ack the sockets receive is checked against docs/asyncapi.yaml.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';
import { loadSchemas, watch } from './asyncapi.mjs';
import { SERVER_API_KEY, startTopology, register, createRoom, once } from './harness.mjs';

let topo;
let ann;
let bob;
let room;
let schemas;
const sockets = [];
const checker = { problems: [], seen: new Map() };

before(async () => {
  schemas = await loadSchemas();
  topo = await startTopology();
  const base = topo.gateways[0].url;
  ann = await register(base, 'ann');
  bob = await register(base, 'bob');
  room = await createRoom(base, ann.accessToken, [bob.user._id]);
});

after(async () => {
  for (const s of sockets) s.disconnect();
  await topo?.stop();
});

function connect(gateway, opts) {
  // withCredentials: Node's client keeps the load balancer's affinity cookie only with it
  // (polling through HAProxy, CHAT_URL); harmless straight to a gateway.
  const socket = io(`${topo.gateways[gateway].url}/chat`, {
    reconnection: false, forceNew: true, withCredentials: true, ...opts,
  });
  sockets.push(socket);
  return watch(socket, schemas, checker);
}

async function connected(socket) {
  if (!socket.connected) await once(socket, 'connect');
  return socket;
}

test('auth.token is accepted, a missing or bad token is refused with a reason', async () => {
  await connected(connect(0, { auth: { token: ann.accessToken } }));
  const missing = await once(connect(0, {}), 'connect_error');
  assert.equal(missing.message, 'missing token');
  const invalid = await once(connect(0, { auth: { token: 'nope' } }), 'connect_error');
  assert.equal(invalid.message, 'invalid token');
});

test('the Authorization header (extraHeaders) is accepted', async () => {
  const s = await connected(connect(1, { extraHeaders: { Authorization: `Bearer ${bob.accessToken}` } }));
  const ack = await s.emitWithAck('join_room', { roomId: room._id });
  assert.deepEqual(ack, { ok: true, roomId: room._id });
});

for (const transports of [['websocket'], ['polling'], ['polling', 'websocket']]) {
  test(`join, send, message and typing over ${transports.join(' then ')}`, async () => {
    const a = await connected(connect(0, { transports, auth: { token: ann.accessToken } }));
    const b = await connected(connect(1, { transports, auth: { token: bob.accessToken } }));
    assert.deepEqual(await a.emitWithAck('join_room', { roomId: room._id }), { ok: true, roomId: room._id });
    assert.deepEqual(await b.emitWithAck('join_room', { roomId: room._id }), { ok: true, roomId: room._id });

    const gotA = once(a, 'message');
    const gotB = once(b, 'message');
    const ack = await a.emitWithAck('send_message', { roomId: room._id, content: `hello over ${transports}` });
    assert.equal(ack.ok, true);
    const expected = {
      id: ack.id,
      roomId: room._id,
      sender: { _id: ann.user._id, email: ann.user.email, displayName: 'ann' },
      content: `hello over ${transports}`,
      createdAt: ack.createdAt,
    };
    // The room's sequence number: a positive integer, the same for every member.
    const received = await gotB;
    assert.ok(Number.isInteger(received.seq) && received.seq >= 1, `seq ${received.seq}`);
    expected.seq = received.seq;
    assert.deepEqual(received, expected);
    assert.deepEqual(await gotA, expected);
    assert.match(expected.createdAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);

    const typing = once(b, 'user_typing');
    a.emit('typing', { roomId: room._id });
    assert.deepEqual(await typing, { userId: ann.user._id, roomId: room._id });

    // The seed's fire-and-forget style works too.
    const next = once(b, 'message');
    a.emit('send_message', { roomId: room._id, content: 'no ack' });
    assert.equal((await next).content, 'no ack');
    a.disconnect();
    b.disconnect();
  });
}

test('errors come as failure acks, or as `exception` without an ack', async () => {
  const a = await connected(connect(0, { auth: { token: ann.accessToken } }));
  const ack = await a.emitWithAck('send_message', { roomId: room._id, content: '' });
  assert.deepEqual(ack, { ok: false, error: { code: 'BAD_REQUEST', message: 'content must not be empty' } });
  const exception = once(a, 'exception');
  a.emit('join_room', { roomId: 'not-an-id' });
  assert.deepEqual(await exception, {
    status: 'error', event: 'join_room', code: 'BAD_REQUEST', message: 'roomId must be a 24-character hex ObjectId',
  });
  assert.equal(a.connected, true);
});

test('join_room with afterSeq replays what was missed before its ack (the reconnect pattern)', async () => {
  const base = topo.gateways[0].url;
  const fresh = await createRoom(base, ann.accessToken, [bob.user._id]);
  const a = await connected(connect(0, { auth: { token: ann.accessToken } }));
  for (let i = 1; i <= 5; i++) {
    const ack = await a.emitWithAck('send_message', { roomId: fresh._id, content: `m${i}` });
    assert.equal(ack.ok, true);
  }
  // Stored, so that the replay has all of them.
  for (let tries = 0; ; tries++) {
    const res = await fetch(`${base}/chat/rooms/${fresh._id}/messages?afterSeq=0`, {
      headers: { Authorization: `Bearer ${bob.accessToken}` },
    });
    if ((await res.json()).length === 5) break;
    assert.ok(tries < 200, 'messages not stored');
    await new Promise((r) => setTimeout(r, 25));
  }
  const b = await connected(connect(1, { auth: { token: bob.accessToken } }));
  const got = [];
  b.on('message', (m) => got.push(m.seq));
  const ack = await b.emitWithAck('join_room', { roomId: fresh._id, afterSeq: 2 });
  assert.deepEqual(ack, { ok: true, roomId: fresh._id, replayed: 3, hasMore: false });
  assert.deepEqual(got, [3, 4, 5]);
  const live = once(b, 'message');
  await a.emitWithAck('send_message', { roomId: fresh._id, content: 'm6' });
  assert.equal((await live).seq, 6);
});

test('presence, a server event and an exception match docs/asyncapi.yaml', async () => {
  // Two people new to the suite, in a room of their own: nobody is online there yet.
  const base = topo.gateways[0].url;
  const carol = await register(base, 'carol');
  const dave = await register(base, 'dave');
  const room = await createRoom(base, carol.accessToken, [dave.user._id]);
  const a = await connected(connect(0, { auth: { token: carol.accessToken } }));
  const b = await connected(connect(1, { auth: { token: dave.accessToken } }));
  const online = once(a, 'presence');
  assert.equal((await a.emitWithAck('join_room', { roomId: room._id })).ok, true);
  await online;
  const bobOnline = once(a, 'presence');
  assert.equal((await b.emitWithAck('join_room', { roomId: room._id })).ok, true);
  await bobOnline;
  assert.equal((await a.emitWithAck('get_presence', { roomId: room._id })).ok, true);
  // Listening before typing: the notice may reach Dave before the ack reaches Carol.
  const typed = once(b, 'user_typing');
  assert.equal((await a.emitWithAck('typing', { roomId: room._id })).ok, true);
  await typed;
  const uploaded = once(b, 'file_uploaded');
  const res = await fetch(`${topo.gateways[0].url}/server/rooms/${room._id}/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${SERVER_API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ event: 'file_uploaded', data: { fileId: 'f1', name: 'a.pdf' } }),
  });
  assert.equal(res.status, 202);
  const event = await uploaded;
  assert.equal(event.fileId, 'f1');
  assert.equal(event.roomId, room._id);
  // An event without an ack that fails: `exception`.
  const failed = once(a, 'exception');
  a.emit('send_message', { roomId: room._id, content: '' });
  assert.equal((await failed).code, 'BAD_REQUEST');
  assert.equal((await a.emitWithAck('leave_room', { roomId: room._id })).ok, true);
});

test('everything received matched docs/asyncapi.yaml', () => {
  assert.deepEqual(checker.problems, []);
  for (const id of ['message', 'user_typing', 'presence', 'file_uploaded', 'exception',
    'join_room_ack', 'send_message_ack', 'get_presence_ack', 'ok_ack']) {
    assert.ok(checker.seen.get(id) > 0, `no ${id} was checked`);
  }
});
