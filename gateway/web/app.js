// The chat page: REST for accounts, rooms and history; Socket.IO (namespace /chat) for live
// messages and typing. The Socket.IO client below speaks Engine.IO v4 / Socket.IO v5 over
// one WebSocket, which is all this page needs; any official client works the same way.
'use strict';

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem('chat.token'),
  user: null,
  room: null,
  rendered: new Set(),
  // The open room's messages are numbered 1, 2, 3… (`seq`): every message up to `caughtUp`
  // is on the page, and `ahead` holds the numbers on the page above it (live messages that
  // came before a gap was filled).
  caughtUp: 0,
  ahead: new Set(),
  names: new Map(),
  socket: null,
  typingSentAt: 0,
  // Who is online in the open room (user ids).
  online: new Set(),
  // Whether the room list's error on the page came from loading the list.
  roomsFailed: false,
  // Rooms the socket is joined to (every listed room, up to JOINED_ROOMS), and the
  // messages of each that arrived while another room was open.
  joined: new Set(),
  unread: new Map(),
  typingTimer: null,
  roomsTimer: null,
};

// ---- REST ---------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { 'Content-Type': 'application/json' };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) {
    const error = new Error((data && data.message) || res.statusText);
    error.status = res.status;
    throw error;
  }
  return data;
}

// ---- Socket.IO over WebSocket -----------------------------------------------------------

class ChatSocket {
  constructor(token, handlers) {
    this.token = token;
    this.handlers = handlers;
    this.acks = new Map();
    this.nextAck = 0;
    this.stopped = false;
    this.retryMs = 500;
    this.open();
  }

  open() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${scheme}//${location.host}/socket.io/?EIO=4&transport=websocket`);
    this.ws = ws;
    this.connected = false;
    ws.onmessage = (event) => this.packet(String(event.data));
    ws.onclose = () => {
      this.connected = false;
      this.handlers.status(false);
      for (const pending of this.acks.values()) pending.reject(new Error('disconnected'));
      this.acks.clear();
      if (!this.stopped) {
        setTimeout(() => this.open(), this.retryMs);
        this.retryMs = Math.min(this.retryMs * 2, 10_000);
      }
    };
  }

  packet(text) {
    if (text[0] === '0') {
      // Engine.IO open: connect to the namespace with the token.
      this.ws.send('40/chat,' + JSON.stringify({ token: this.token }));
    } else if (text === '2') {
      this.ws.send('3');
    } else if (text.startsWith('40/chat,')) {
      this.connected = true;
      this.retryMs = 500;
      this.handlers.status(true);
      this.handlers.connect();
    } else if (text.startsWith('44/chat,')) {
      const error = JSON.parse(text.slice(8));
      this.stop();
      this.handlers.refused(error.message || 'connection refused');
    } else if (text.startsWith('41/chat,')) {
      this.ws.close();
    } else if (text.startsWith('42/chat,')) {
      const [name, data] = JSON.parse(text.slice(8));
      this.handlers.event(name, data);
    } else if (text.startsWith('43/chat,')) {
      const rest = text.slice(8);
      const start = rest.indexOf('[');
      const id = Number(rest.slice(0, start));
      const [payload] = JSON.parse(rest.slice(start));
      const pending = this.acks.get(id);
      if (pending) {
        this.acks.delete(id);
        pending.resolve(payload);
      }
    }
  }

  emit(name, data) {
    return new Promise((resolve, reject) => {
      if (!this.connected) {
        reject(new Error('not connected'));
        return;
      }
      const id = this.nextAck++;
      this.acks.set(id, { resolve, reject });
      this.ws.send('42/chat,' + id + JSON.stringify([name, data]));
    });
  }

  stop() {
    this.stopped = true;
    this.ws.close();
  }
}

// ---- Accounts ---------------------------------------------------------------------------

function showError(id, error) {
  $(id).textContent = error ? error.message || String(error) : '';
}

async function signIn(path, body) {
  showError('auth-error', null);
  try {
    const { accessToken, user } = await api('POST', path, body);
    state.token = accessToken;
    sessionStorage.setItem('chat.token', accessToken);
    start(user);
  } catch (error) {
    showError('auth-error', error);
  }
}

$('auth-form').addEventListener('submit', (event) => {
  event.preventDefault();
  signIn('/auth/login', { email: $('email').value, password: $('password').value });
});

$('register').addEventListener('click', () => {
  if (!$('auth-form').reportValidity()) return;
  const body = { email: $('email').value, password: $('password').value };
  const displayName = $('display-name').value.trim();
  if (displayName) body.displayName = displayName;
  signIn('/auth/register', body);
});

$('logout').addEventListener('click', () => {
  sessionStorage.removeItem('chat.token');
  location.reload();
});

function start(user) {
  state.user = user;
  state.names.set(user._id, user.displayName);
  $('auth').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  $('me').textContent = user.displayName;
  state.socket = new ChatSocket(state.token, {
    status: (online) => {
      $('status').textContent = online ? 'online' : 'offline';
      $('status').classList.toggle('online', online);
    },
    connect: () => {
      // Errors of the connection that was lost are over.
      showError('chat-error', null);
      // A new connection is in no room: the listed ones are joined again below.
      state.joined.clear();
      joinListed();
      // After a reconnect the server knows nothing of our rooms: join the open one again,
      // replaying what was missed meanwhile.
      if (state.room) {
        catchUp(state.room)
          .then(() => loadPresence(state.room))
          .catch((error) => showError('chat-error', error));
      }
    },
    refused: (message) => {
      showError('chat-error', new Error(`connection refused: ${message}`));
      if (message === 'token expired' || message === 'invalid token') {
        sessionStorage.removeItem('chat.token');
      }
    },
    event: onEvent,
  });
  loadRooms();
  // Rooms others put us in arrive as `room_added`; the list is read again now and then in
  // case a notice was missed (a reconnect at that moment).
  state.roomsTimer = setInterval(loadRooms, 30_000);
}

// ---- Rooms -----------------------------------------------------------------------------

// The API lists rooms a page at a time, most recently active first: up to ROOM_PAGES pages.
const ROOM_PAGE = 100;
const ROOM_PAGES = 10;

async function fetchRooms() {
  const rooms = [];
  const seen = new Set();
  for (let page = 0; page < ROOM_PAGES; page += 1) {
    const before = rooms.length ? `&before=${rooms[rooms.length - 1]._id}` : '';
    const next = await api('GET', `/chat/rooms?limit=${ROOM_PAGE}${before}`);
    const fresh = next.filter((room) => !seen.has(room._id));
    fresh.forEach((room) => seen.add(room._id));
    rooms.push(...fresh);
    if (next.length < ROOM_PAGE || fresh.length === 0) break;
  }
  return rooms;
}

// The socket joins every listed room, most recently active first, up to this many (a
// reconnect joins them again at once, within the server's join burst), so that each shows
// its unread messages.
const JOINED_ROOMS = 100;

async function loadRooms() {
  try {
    const rooms = await fetchRooms();
    state.listed = rooms;
    joinListed();
    // A failure of an earlier load ("Failed to fetch" while the server restarted) is over.
    if (state.roomsFailed) {
      state.roomsFailed = false;
      showError('room-error', null);
    }
    const list = $('rooms');
    list.replaceChildren(
      ...rooms.map((room) => {
        const li = document.createElement('li');
        li.dataset.roomId = room._id;
        li.classList.toggle('active', state.room !== null && state.room._id === room._id);
        const button = document.createElement('button');
        button.type = 'button';
        button.addEventListener('click', () => openRoom(room));
        li.append(button);
        return li;
      }),
    );
    showUnread();
  } catch (error) {
    state.roomsFailed = true;
    showError('room-error', error);
  }
}

$('room-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  showError('room-error', null);
  try {
    const emails = $('room-emails').value.split(',').map((e) => e.trim()).filter(Boolean);
    const users = await Promise.all(
      emails.map((email) => api('GET', `/users?email=${encodeURIComponent(email)}`)),
    );
    const body = { participantIds: users.map((u) => u._id) };
    const name = $('room-name').value.trim();
    if (name) body.name = name;
    const room = await api('POST', '/chat/rooms', body);
    $('room-name').value = '';
    $('room-emails').value = '';
    await loadRooms();
    await openRoom(room);
  } catch (error) {
    showError('room-error', error);
  }
});

/** Joins the listed rooms the socket is not in yet (the open one catches up on its own). */
function joinListed() {
  if (!state.socket || !state.socket.connected) return;
  for (const room of (state.listed || []).slice(0, JOINED_ROOMS)) {
    if (state.joined.has(room._id) || (state.room && state.room._id === room._id)) continue;
    state.joined.add(room._id);
    state.socket.emit('join_room', { roomId: room._id }).then(
      (ack) => { if (!ack.ok) state.joined.delete(room._id); },
      () => state.joined.delete(room._id),
    );
  }
}

/** Shows a room's unread count on its button in the list. */
function showUnread() {
  for (const li of $('rooms').children) {
    const room = (state.listed || []).find((r) => r._id === li.dataset.roomId);
    if (!room) continue;
    const button = li.querySelector('button');
    const count = state.unread.get(room._id) || 0;
    button.textContent = room.name || `Room ${room._id.slice(-6)}`;
    if (count) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = String(count);
      badge.title = `${count} unread`;
      button.append(' ', badge);
    }
  }
}

async function openRoom(room) {
  showError('chat-error', null);
  state.unread.delete(room._id);
  showUnread();
  state.room = room;
  state.joined.add(room._id);
  state.online = new Set();
  $('online').textContent = '';
  state.rendered.clear();
  state.caughtUp = 0;
  state.ahead.clear();
  $('messages').replaceChildren();
  $('typing').textContent = '';
  $('room-title').textContent = room.name || `Room ${room._id.slice(-6)}`;
  $('composer').hidden = false;
  $('room-actions').hidden = false;
  $('add-form').hidden = room.ownerId !== state.user._id;
  $('room-status').textContent = '';
  for (const li of $('rooms').children) li.classList.toggle('active', li.dataset.roomId === room._id);
  try {
    // Join first so nothing sent while the history loads is missed; duplicates are skipped.
    const ack = await state.socket.emit('join_room', { roomId: room._id });
    if (!ack.ok) throw new Error(ack.error.message);
    const history = await api('GET', `/chat/rooms/${room._id}/messages?limit=50`);
    // The page starts at the oldest message shown: nothing before it is owed.
    const oldest = history.length ? history[history.length - 1].seq : undefined;
    if (typeof oldest === 'number' && state.caughtUp === 0) state.caughtUp = oldest - 1;
    history.reverse().forEach(render);
    // The history holds chat messages only: the catch-up listing fills in the server
    // events between them (a file uploaded…), so that no number is left unseen. A few pages
    // at most: a room of events alone is not read from its start on every open.
    await pageAfter(room, state.caughtUp, 3);
    await loadPresence(room);
  } catch (error) {
    showError('chat-error', error);
  }
}

/** Joins `room` with the number of the last message the page holds without a gap: the
 * server replays what follows before anything live; past its replay limit (`hasMore`) the
 * rest is paged over REST. */
async function catchUp(room) {
  const ack = await state.socket.emit('join_room', { roomId: room._id, afterSeq: state.caughtUp });
  if (!ack.ok) throw new Error(ack.error.message);
  if (ack.hasMore) await pageAfter(room, state.caughtUp);
}

/** Renders the items of `room` after `seq` (messages and server events), page by page,
 * at most `pages` pages. */
async function pageAfter(room, seq, pages = Infinity) {
  let after = seq;
  for (let n = 0; n < pages && state.room && state.room._id === room._id; n += 1) {
    const page = await api('GET', `/chat/rooms/${room._id}/messages?afterSeq=${after}&limit=100`);
    page.forEach((item) => (item.event ? renderEvent(item.event, item.data, item) : render(item)));
    if (page.length < 100) return;
    after = page[page.length - 1].seq;
  }
}

// ---- Messages and typing ----------------------------------------------------------------

/** Counts `seq` as shown and moves `caughtUp` over every number now shown without a gap. */
function track(seq) {
  if (typeof seq !== 'number' || seq <= state.caughtUp) return;
  state.ahead.add(seq);
  while (state.ahead.delete(state.caughtUp + 1)) state.caughtUp += 1;
}

/** What the page shows for the server events it knows; others show their name. */
const SERVER_EVENTS = new Map([
  ['file_uploaded', 'a file was uploaded'],
  ['file_unlocked', 'a file was unlocked'],
]);
/** The gateway's own events: any other event with a room and a number is a server event
 * (the deployment's SERVER_EVENTS may name more than the two above). */
const OWN_EVENTS = new Set(['message', 'user_typing', 'room_added', 'presence', 'resync', 'exception']);

/** Shows a server event (a backend service posted it into the room's sequence): its name,
 * its data, and `item` with its room, number and (listed) time. Live, the payload is
 * `{...data, roomId, seq}` and is both; listed, `{id, roomId, seq, createdAt, event, data}`. */
function renderEvent(name, data, item) {
  const key = `seq:${item.seq}`;
  if (!state.room || item.roomId !== state.room._id || state.rendered.has(key)) return;
  state.rendered.add(key);
  track(item.seq);
  const li = document.createElement('li');
  li.className = 'message server-event';
  const text = document.createElement('span');
  text.className = 'content';
  const file = typeof data.name === 'string' ? `: ${data.name}` : '';
  text.textContent = `${SERVER_EVENTS.get(name) || name}${file}`;
  li.append(text);
  if (item.event && item.createdAt) {
    const time = document.createElement('time');
    time.className = 'time';
    time.dateTime = item.createdAt;
    time.textContent = new Date(item.createdAt).toLocaleTimeString();
    li.append(time);
  }
  place(li, item.seq);
}

/** Puts an item in the conversation in `seq` order, whatever order they arrived in (a gap
 * filled after live messages). */
function place(li, seq) {
  const list = $('messages');
  if (typeof seq === 'number') li.dataset.seq = String(seq);
  const after = typeof seq === 'number'
    ? [...list.children].find((other) => Number(other.dataset.seq) > seq)
    : undefined;
  list.insertBefore(li, after || null);
  list.scrollTop = list.scrollHeight;
}

function render(message) {
  if (!state.room || message.roomId !== state.room._id || state.rendered.has(message.id)) return;
  state.rendered.add(message.id);
  track(message.seq);
  const sender = message.sender || {};
  const name = sender.displayName || sender.email || sender._id;
  if (sender._id && name) state.names.set(sender._id, name);
  const li = document.createElement('li');
  li.className = 'message';
  li.dataset.id = message.id;
  const who = document.createElement('span');
  who.className = 'sender';
  who.textContent = name;
  const content = document.createElement('span');
  content.className = 'content';
  content.textContent = message.content;
  const time = document.createElement('time');
  time.className = 'time';
  time.dateTime = message.createdAt;
  time.textContent = new Date(message.createdAt).toLocaleTimeString();
  li.append(who, content, time);
  place(li, message.seq);
}

async function nameOf(userId) {
  if (!state.names.has(userId)) {
    try {
      state.names.set(userId, (await api('GET', `/users/${userId}`)).displayName);
    } catch {
      return 'Someone';
    }
  }
  return state.names.get(userId);
}

/** Who is online in `room`, from the server; `presence` events keep it up to date. */
async function loadPresence(room) {
  const ack = await state.socket.emit('get_presence', { roomId: room._id });
  if (!ack.ok || !state.room || state.room._id !== room._id) return;
  state.online = new Set(ack.online);
  await showOnline();
}

async function showOnline() {
  const room = state.room;
  const names = await Promise.all([...state.online].map(nameOf));
  if (state.room !== room) return;
  $('online').textContent = names.length ? `Online: ${names.sort().join(', ')}` : '';
}

async function onEvent(name, data) {
  if (name === 'message') {
    if ((!state.room || data.roomId !== state.room._id) && data.sender?._id !== state.user._id) {
      state.unread.set(data.roomId, (state.unread.get(data.roomId) || 0) + 1);
      showUnread();
    }
    render(data);
    if (state.room && data.roomId === state.room._id) $('typing').textContent = '';
  } else if (name === 'user_typing') {
    if (!state.room || data.roomId !== state.room._id || data.userId === state.user._id) return;
    $('typing').textContent = `${await nameOf(data.userId)} is typing…`;
    clearTimeout(state.typingTimer);
    state.typingTimer = setTimeout(() => { $('typing').textContent = ''; }, 3000);
  } else if (name === 'room_added') {
    loadRooms();
  } else if (name === 'presence') {
    if (!state.room || data.roomId !== state.room._id) return;
    if (data.online) state.online.add(data.userId);
    else state.online.delete(data.userId);
    await showOnline();
  } else if (!OWN_EVENTS.has(name) && typeof data?.roomId === 'string' && typeof data?.seq === 'number') {
    if (!state.room || data.roomId !== state.room._id) {
      state.unread.set(data.roomId, (state.unread.get(data.roomId) || 0) + 1);
      showUnread();
    }
    renderEvent(name, data, data);
  } else if (name === 'resync') {
    // The server could not fill a gap in our live messages and took us out of the room:
    // join again from the last message we hold without a gap.
    if (state.room && data.roomId === state.room._id) {
      catchUp(state.room).catch((error) => showError('chat-error', error));
    }
  } else if (name === 'exception') {
    if (data.message === 'token expired') sessionStorage.removeItem('chat.token');
    showError('chat-error', new Error(data.message));
  }
}

$('message-input').addEventListener('input', () => {
  const now = Date.now();
  if (!state.room || now - state.typingSentAt < 1500) return;
  state.typingSentAt = now;
  state.socket.emit('typing', { roomId: state.room._id }).catch(() => {});
});

const newId = () =>
  (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`);

$('add-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const room = state.room;
  if (!room) return;
  $('room-status').textContent = '';
  showError('chat-error', null);
  try {
    const email = $('add-email').value.trim();
    const user = await api('GET', `/users?email=${encodeURIComponent(email)}`);
    state.room = await api('POST', `/chat/rooms/${room._id}/participants`, { userId: user._id });
    state.names.set(user._id, user.displayName);
    $('add-email').value = '';
    $('room-status').textContent = `${user.displayName} was added.`;
  } catch (error) {
    showError('chat-error', error);
  }
});

$('leave').addEventListener('click', async () => {
  const room = state.room;
  if (!room) return;
  showError('chat-error', null);
  try {
    await api('DELETE', `/chat/rooms/${room._id}/participants/${state.user._id}`);
    state.joined.delete(room._id);
    state.unread.delete(room._id);
    state.room = null;
    state.online = new Set();
    $('room-title').textContent = 'Pick a room';
    $('online').textContent = '';
    $('messages').replaceChildren();
    $('typing').textContent = '';
    $('composer').hidden = true;
    $('room-actions').hidden = true;
    await loadRooms();
  } catch (error) {
    showError('chat-error', error);
  }
});

// Enter sends; Shift+Enter starts a new line (and so does Enter while an input method
// composes a word).
$('message-input').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $('composer').requestSubmit();
  }
});

// The server's limit, counted as it counts: Unicode code points, not UTF-16 units.
const MAX_MESSAGE = 10_000;

$('composer').addEventListener('submit', async (event) => {
  event.preventDefault();
  const input = $('message-input');
  const content = input.value;
  if (!state.room) return;
  if (!content.trim()) {
    showError('chat-error', new Error('Write something first: the message is empty.'));
    return;
  }
  const length = [...content].length;
  if (length > MAX_MESSAGE) {
    showError('chat-error', new Error(
      `The message is ${length.toLocaleString('en')} characters long; at most ${MAX_MESSAGE.toLocaleString('en')} fit.`,
    ));
    return;
  }
  showError('chat-error', null);
  try {
    // The same clientMsgId on a retry never makes a second message.
    const ack = await state.socket.emit('send_message', {
      roomId: state.room._id,
      content,
      clientMsgId: newId(),
    });
    if (!ack.ok) throw new Error(ack.error.message);
    input.value = '';
  } catch (error) {
    showError('chat-error', error);
  }
});

// ---- Start --------------------------------------------------------------------------------

if (state.token) {
  api('GET', '/auth/me').then(start, () => {
    sessionStorage.removeItem('chat.token');
    state.token = null;
  });
}
