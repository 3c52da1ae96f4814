// The chat page in a real browser (Debian's Chromium, driven by playwright-core): two people
// register, one creates a room with the other by e-mail, they see each other typing and
// exchange messages; the page at a phone's width and a desktop's with a long word; line
// breaks, the length counted as the server counts, empty and over-long sends; who is online;
// adding and leaving; unread counts of the other rooms; a file a backend service announced.
// Screenshots go to target/artifacts/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { SERVER_API_KEY, startEmbedded } from './harness.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const artifacts = path.join(root, 'target', 'artifacts');
const TIMEOUT = 15_000;

let server;
let browser;

before(async () => {
  server = await startEmbedded();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

async function person(name, email, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const problems = [];
  page.on('pageerror', (e) => problems.push(e.message));
  await page.goto(server.gateways[0].url + '/');
  await page.fill('#email', email);
  await page.fill('#password', 'password123');
  await page.fill('#display-name', name);
  await page.click('#register');
  await page.waitForSelector('#app:not([hidden])');
  await page.waitForSelector('#status.online');
  assert.equal(await page.textContent('#me'), name);
  return { context, page, problems };
}

test('two people chat in the browser page', async () => {
  const run = Date.now();
  const ann = await person('Ann', `ann-${run}@example.com`);
  const bob = await person('Bob', `bob-${run}@example.com`);

  // Ann creates a room with Bob, picked by e-mail.
  await ann.page.fill('#room-name', 'Lunch');
  await ann.page.fill('#room-emails', `BOB-${run}@example.com`);
  await ann.page.click('#create-room');
  await ann.page.waitForSelector('#room-title:text("Lunch")');
  assert.equal(await ann.page.textContent('#room-error'), '');

  // Bob's room list picks it up without a reload; he opens it.
  await bob.page.click('#rooms li button:text("Lunch")', { timeout: TIMEOUT });
  await bob.page.waitForSelector('#room-title:text("Lunch")');

  // Typing shows on the other side.
  await ann.page.type('#message-input', 'Hi Bob');
  await bob.page.waitForSelector('#typing:text("Ann is typing")');

  await ann.page.click('#send');
  await bob.page.waitForSelector('#messages li .content:text("Hi Bob")');
  await ann.page.waitForSelector('#messages li .content:text("Hi Bob")');
  assert.equal(await ann.page.inputValue('#message-input'), '');

  await bob.page.type('#message-input', 'Hello Ann!');
  await ann.page.waitForSelector('#typing:text("Bob is typing")');
  await bob.page.press('#message-input', 'Enter');
  await ann.page.waitForSelector('#messages li .content:text("Hello Ann!")');
  await bob.page.waitForSelector('#messages li .content:text("Hello Ann!")');

  // Both see the same conversation, in order, once each.
  for (const p of [ann.page, bob.page]) {
    const lines = await p.$$eval('#messages li', (items) =>
      items.map((li) => `${li.querySelector('.sender').textContent}: ${li.querySelector('.content').textContent}`));
    assert.deepEqual(lines, ['Ann: Hi Bob', 'Bob: Hello Ann!']);
  }

  // A reload keeps the session and shows the history from the server.
  await bob.page.reload();
  await bob.page.waitForSelector('#status.online');
  await bob.page.click('#rooms li button:text("Lunch")');
  await bob.page.waitForSelector('#messages li .content:text("Hello Ann!")');
  assert.equal(await bob.page.locator('#messages li').count(), 2);

  mkdirSync(artifacts, { recursive: true });
  await ann.page.screenshot({ path: path.join(artifacts, 'chat-page-ann.png'), fullPage: true });
  await bob.page.screenshot({ path: path.join(artifacts, 'chat-page-bob.png'), fullPage: true });
  await done(ann, bob);
});

test('after a server restart the page reconnects and shows what it missed, once, in order', async () => {
  const { ann, bob } = await pair('Restart');
  const say = async (text) => {
    await ann.page.fill('#message-input', text);
    await ann.page.click('#send');
    await ann.page.waitForSelector(`#messages li .content:text("${text}")`);
  };
  await say('before');
  await bob.page.waitForSelector('#messages li .content:text("before")');

  // Bob's page cannot reconnect until Ann has sent three more after the restart: it misses
  // them live and must catch up by itself.
  let blocked = true;
  await bob.page.routeWebSocket(/\/socket\.io\//, (ws) => {
    if (blocked) ws.close();
    else ws.connectToServer();
  });
  await server.restart();
  await ann.page.waitForSelector('#status.online');
  for (const text of ['missed 1', 'missed 2', 'missed 3']) await say(text);
  assert.equal(await bob.page.textContent('#status'), 'offline');
  blocked = false;
  await bob.page.waitForSelector('#status.online');
  await bob.page.waitForSelector('#messages li .content:text("missed 3")');
  await say('live again');
  await bob.page.waitForSelector('#messages li .content:text("live again")');
  // No error of the outage stays on the page (the room list's next load clears its own).
  await bob.page.waitForFunction(
    () => document.getElementById('room-error').textContent === ''
      && document.getElementById('chat-error').textContent === '',
  );
  const lines = (p) => p.$$eval('#messages li .content', (items) => items.map((i) => i.textContent));
  assert.deepEqual(await lines(bob.page), ['before', 'missed 1', 'missed 2', 'missed 3', 'live again']);
  assert.deepEqual(await lines(ann.page), await lines(bob.page));
  await done(ann, bob);
});

test('a wrong password shows the server\'s error', async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  await page.goto(server.gateways[0].url + '/');
  await page.fill('#email', 'nobody@example.com');
  await page.fill('#password', 'wrong-password');
  await page.click('#login');
  await page.waitForSelector('#auth-error:text("invalid email or password")');
  await context.close();
});

/** No page error on anyone's page; their browsers closed. */
async function done(...people) {
  assert.deepEqual(people.flatMap((p) => p.problems), []);
  for (const p of people) await p.context.close();
}

/** Ann and Bob (Bob at `viewport`) in a new room called `name`, both with it open. */
async function pair(name, viewport) {
  const run = `${Date.now()}-${Math.random().toString(16).slice(2, 8)}`;
  const ann = await person('Ann', `ann-${name}-${run}@example.com`);
  const bob = await person('Bob', `bob-${name}-${run}@example.com`, viewport);
  await ann.page.fill('#room-name', name);
  await ann.page.fill('#room-emails', `bob-${name}-${run}@example.com`);
  await ann.page.click('#create-room');
  await ann.page.waitForSelector(`#room-title:text("${name}")`);
  await bob.page.click(`#rooms li button:text("${name}")`, { timeout: TIMEOUT });
  await bob.page.waitForSelector(`#room-title:text("${name}")`);
  return { ann, bob };
}

/** Nothing wider than the window, and the Send button fully on screen. */
async function fits(page) {
  return page.evaluate(() => {
    const send = document.getElementById('send').getBoundingClientRect();
    return {
      scrollWidth: document.documentElement.scrollWidth,
      width: window.innerWidth,
      sendRight: Math.ceil(send.right),
    };
  });
}

test('a long word wraps and Send stays on screen, on a phone and on a desktop', async () => {
  const { ann, bob } = await pair('Widths', { width: 390, height: 844 });
  const word = `https://example.com/${'a'.repeat(170)}`;
  assert.equal(word.length, 190);
  await ann.page.fill('#message-input', word);
  await ann.page.click('#send');
  for (const p of [ann.page, bob.page]) {
    await p.waitForSelector(`#messages li .content:text("${word}")`);
    const { scrollWidth, width, sendRight } = await fits(p);
    assert.ok(scrollWidth <= width, `the page is ${scrollWidth} px wide in a ${width} px window`);
    assert.ok(sendRight <= width, `Send ends at ${sendRight} px in a ${width} px window`);
  }
  mkdirSync(artifacts, { recursive: true });
  await bob.page.screenshot({ path: path.join(artifacts, 'chat-page-phone-390.png'), fullPage: true });
  await ann.page.screenshot({ path: path.join(artifacts, 'chat-page-desktop-1280.png'), fullPage: true });
  await done(ann, bob);
});

test('line breaks are kept, the length is counted as the server counts, and empty or over-long sends say why', async () => {
  const { ann, bob } = await pair('Lines');
  const input = '#message-input';
  // Shift+Enter starts a new line; Enter sends.
  await ann.page.type(input, 'line one');
  await ann.page.press(input, 'Shift+Enter');
  await ann.page.type(input, 'line two');
  await ann.page.press(input, 'Enter');
  await bob.page.waitForSelector('#messages li .content:text("line two")');
  const shown = await bob.page.$eval('#messages li .content', (c) => c.textContent);
  assert.equal(shown, 'line one\nline two');
  // An empty send says so, and sends nothing.
  await ann.page.click('#send');
  await ann.page.waitForSelector('#chat-error:text("the message is empty")');
  // 10,001 characters: refused on the page, with the count, and the text kept.
  await ann.page.fill(input, 'x'.repeat(10_001));
  await ann.page.click('#send');
  await ann.page.waitForSelector('#chat-error:text("10,001 characters")');
  assert.equal((await ann.page.inputValue(input)).length, 10_001);
  // 6,000 emoji are 12,000 UTF-16 units but 6,000 characters as the server counts: sent.
  const smiles = '\u{1F600}'.repeat(6_000);
  await ann.page.fill(input, smiles);
  await ann.page.click('#send');
  await bob.page.waitForFunction(
    () => [...document.querySelectorAll('#messages li .content')]
      .some((c) => [...c.textContent].length === 6000),
  );
  assert.equal(await ann.page.inputValue(input), '');
  assert.equal(await ann.page.textContent('#chat-error'), '');
  assert.equal(await bob.page.locator('#messages li').count(), 2);
  await done(ann, bob);
});

test('who is online shows in the open room, and changes as people come and go', async () => {
  const { ann, bob } = await pair('Presence');
  await ann.page.waitForSelector('#online:text("Online: Ann, Bob")');
  await bob.page.waitForSelector('#online:text("Online: Ann, Bob")');
  mkdirSync(artifacts, { recursive: true });
  await ann.page.screenshot({ path: path.join(artifacts, 'chat-page-presence.png'), fullPage: true });
  await bob.context.close();
  await ann.page.waitForSelector('#online:text-is("Online: Ann")');
  await done(ann, bob);
});

test('the owner adds someone, whose list shows the room at once (room_added); they leave it', async () => {
  const run = `${Date.now()}-${Math.random().toString(16).slice(2, 8)}`;
  const ann = await person('Ann', `ann-add-${run}@example.com`);
  const bob = await person('Bob', `bob-add-${run}@example.com`);
  await ann.page.fill('#room-name', 'Team');
  await ann.page.click('#create-room');
  await ann.page.waitForSelector('#room-title:text("Team")');
  // Only the owner sees the form.
  await ann.page.fill('#add-email', `bob-add-${run}@example.com`);
  await ann.page.click('#add');
  await ann.page.waitForSelector('#room-status:text("Bob was added.")');
  // Pushed, not polled: the list is read again every 30 s only, past this wait.
  await bob.page.click('#rooms li button:text("Team")', { timeout: 10_000 });
  await bob.page.waitForSelector('#room-title:text("Team")');
  assert.equal(await bob.page.isVisible('#add-form'), false);
  await ann.page.waitForSelector('#online:text("Online: Ann, Bob")');
  // Bob leaves: the room goes from his list, and Ann sees him go.
  await bob.page.click('#leave');
  await bob.page.waitForSelector('#room-title:text("Pick a room")');
  await bob.page.waitForSelector('#rooms li button:text("Team")', { state: 'detached' });
  await ann.page.waitForSelector('#online:text-is("Online: Ann")');
  await done(ann, bob);
});

test('every listed room is joined: a message in another room shows as unread until it is opened', async () => {
  const { ann, bob } = await pair('First');
  // A second room for the two; Bob stays in the first.
  await ann.page.fill('#room-name', 'Second');
  await ann.page.fill('#room-emails', await bob.page.evaluate(() => document.getElementById('email').value));
  await ann.page.click('#create-room');
  await ann.page.waitForSelector('#room-title:text("Second")');
  await bob.page.waitForSelector('#rooms li button:text("Second")');
  await ann.page.fill('#message-input', 'over here');
  await ann.page.click('#send');
  await ann.page.waitForSelector('#messages li .content:text("over here")');
  await bob.page.waitForSelector('#rooms li button:text("Second") .unread:text("1")');
  assert.equal(await bob.page.textContent('#room-title'), 'First');
  mkdirSync(artifacts, { recursive: true });
  await bob.page.screenshot({ path: path.join(artifacts, 'chat-page-unread.png'), fullPage: true });
  await bob.page.click('#rooms li button:text("Second")');
  await bob.page.waitForSelector('#messages li .content:text("over here")');
  assert.equal(await bob.page.locator('#rooms .unread').count(), 0);
  await done(ann, bob);
});

test('a file uploaded through the server API shows in the conversation, live and after a reload', async () => {
  const { ann, bob } = await pair('Files');
  const roomId = await bob.page.getAttribute('#rooms li.active', 'data-room-id');
  await ann.page.fill('#message-input', 'sending the report');
  await ann.page.click('#send');
  await bob.page.waitForSelector('#messages li .content:text("sending the report")');
  const response = await fetch(`${server.gateways[0].url}/server/rooms/${roomId}/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${SERVER_API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ event: 'file_uploaded', data: { fileId: 'f1', name: 'report.pdf' } }),
  });
  assert.equal(response.status, 202);
  assert.deepEqual(await response.json(), { roomId, seq: 2 });
  await ann.page.fill('#message-input', 'there it is');
  await ann.page.click('#send');
  const shown = '#messages li.server-event .content:text("a file was uploaded: report.pdf")';
  const order = (p) => p.$$eval('#messages li .content', (els) => els.map((e) => e.textContent));
  const expected = ['sending the report', 'a file was uploaded: report.pdf', 'there it is'];
  for (const p of [ann.page, bob.page]) {
    await p.waitForSelector(shown);
    await p.waitForSelector('#messages li .content:text("there it is")');
    assert.deepEqual(await order(p), expected);
  }
  mkdirSync(artifacts, { recursive: true });
  await bob.page.screenshot({ path: path.join(artifacts, 'chat-page-file-uploaded.png'), fullPage: true });
  // Opened afresh, the room shows it too (from the catch-up listing), in its place.
  await bob.page.reload();
  await bob.page.waitForSelector('#status.online');
  await bob.page.click('#rooms li button:text("Files")');
  await bob.page.waitForSelector(shown);
  await bob.page.waitForSelector('#messages li .content:text("there it is")');
  assert.deepEqual(await order(bob.page), expected);
  await done(ann, bob);
});
