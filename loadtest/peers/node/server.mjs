// The peer: what a Node.js team would deploy instead of the gateway. socket.io 4 with
// @socket.io/redis-adapter, the same /chat events, payloads, acks and JWT auth.
//
// What it does NOT do (so compare it on fan-out, connections and `typing`, where the two
// do the same work): no MongoDB, no membership checks, no persister. `send_message` is
// broadcast straight through the Redis adapter and acknowledged; nothing is stored.
//
// Environment: PORT (3000), REDIS_URL (redis://127.0.0.1:6379), JWT_SECRET (required).
import { createServer } from 'node:http';
import { randomBytes } from 'node:crypto';
import { Server } from 'socket.io';
import { createAdapter } from '@socket.io/redis-adapter';
import { createClient } from 'redis';
import jwt from 'jsonwebtoken';

const port = Number(process.env.PORT ?? 3000);
const secret = process.env.JWT_SECRET;
if (!secret) {
  console.error('JWT_SECRET is required');
  process.exit(2);
}
const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';

const pub = createClient({ url: redisUrl });
const sub = pub.duplicate();
await Promise.all([pub.connect(), sub.connect()]);

const http = createServer((req, res) => {
  res.writeHead(req.url === '/healthz' ? 200 : 404).end();
});
const io = new Server(http, {
  adapter: createAdapter(pub, sub),
  maxHttpBufferSize: 100_000,
  cors: { origin: '*' },
});
const chat = io.of('/chat');

const HEX24 = /^[0-9a-f]{24}$/i;
let counter = randomBytes(3).readUIntBE(0, 3);
const objectId = () => {
  counter = (counter + 1) % 0xffffff;
  return (
    Math.floor(Date.now() / 1000).toString(16).padStart(8, '0') +
    randomBytes(5).toString('hex') +
    counter.toString(16).padStart(6, '0')
  );
};

chat.use((socket, next) => {
  const header = socket.handshake.headers.authorization ?? '';
  const token = socket.handshake.auth?.token ?? (header.startsWith('Bearer ') ? header.slice(7) : '');
  if (!token) return next(new Error('missing token'));
  try {
    const claims = jwt.verify(token, secret, { algorithms: ['HS256'] });
    socket.data.user = { _id: claims.sub, email: claims.email, displayName: claims.displayName };
    next();
  } catch (e) {
    next(new Error(e.name === 'TokenExpiredError' ? 'token expired' : 'invalid token'));
  }
});

const fail = (socket, event, ack, code, message) => {
  const error = { code, message };
  if (typeof ack === 'function') ack({ ok: false, error });
  else socket.emit('exception', { status: 'error', event, code, message });
};

chat.on('connection', (socket) => {
  const user = socket.data.user;
  socket.on('join_room', (data, ack) => {
    if (!HEX24.test(data?.roomId ?? '')) return fail(socket, 'join_room', ack, 'BAD_REQUEST', 'roomId must be a 24-hex id');
    socket.join(data.roomId);
    if (typeof ack === 'function') ack({ ok: true, roomId: data.roomId });
  });
  socket.on('leave_room', (data, ack) => {
    if (!HEX24.test(data?.roomId ?? '')) return fail(socket, 'leave_room', ack, 'BAD_REQUEST', 'roomId must be a 24-hex id');
    socket.leave(data.roomId);
    if (typeof ack === 'function') ack({ ok: true });
  });
  socket.on('send_message', (data, ack) => {
    const { roomId, content } = data ?? {};
    if (!HEX24.test(roomId ?? '')) return fail(socket, 'send_message', ack, 'BAD_REQUEST', 'roomId must be a 24-hex id');
    const length = typeof content === 'string' ? [...content].length : 0;
    if (length < 1 || length > 10_000) return fail(socket, 'send_message', ack, 'BAD_REQUEST', 'content must be 1 to 10000 characters');
    const message = { id: objectId(), roomId, sender: user, content, createdAt: new Date().toISOString() };
    chat.to(roomId).emit('message', message);
    if (typeof ack === 'function') ack({ ok: true, id: message.id, createdAt: message.createdAt });
  });
  socket.on('typing', (data, ack) => {
    if (!HEX24.test(data?.roomId ?? '')) return fail(socket, 'typing', ack, 'BAD_REQUEST', 'roomId must be a 24-hex id');
    socket.to(data.roomId).emit('user_typing', { userId: user._id, roomId: data.roomId });
    if (typeof ack === 'function') ack({ ok: true });
  });
});

http.listen(port, '127.0.0.1', () => console.log(`peer listening on 127.0.0.1:${port}`));
const stop = () => io.close(() => Promise.all([pub.quit(), sub.quit()]).then(() => process.exit(0)));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
