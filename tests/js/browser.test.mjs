// The chat page in a real browser (Debian's Chromium, driven by playwright-core): two people
// register, one creates a room with the other by e-mail, they see each other typing and
// exchange messages. Screenshots go to target/artifacts/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startEmbedded } from './harness.mjs';

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

async function person(name, email) {
  const context = await browser.newContext();
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
  assert.deepEqual([...ann.problems, ...bob.problems], []);
  await ann.context.close();
  await bob.context.close();
});

test('after a server restart the page reconnects and shows what it missed, once, in order', async () => {
  const run = Date.now();
  const ann = await person('Ann', `ann-r-${run}@example.com`);
  const bob = await person('Bob', `bob-r-${run}@example.com`);
  await ann.page.fill('#room-name', 'Restart');
  await ann.page.fill('#room-emails', `bob-r-${run}@example.com`);
  await ann.page.click('#create-room');
  await ann.page.waitForSelector('#room-title:text("Restart")');
  await bob.page.click('#rooms li button:text("Restart")', { timeout: TIMEOUT });
  await bob.page.waitForSelector('#room-title:text("Restart")');
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
  const lines = (p) => p.$$eval('#messages li .content', (items) => items.map((i) => i.textContent));
  assert.deepEqual(await lines(bob.page), ['before', 'missed 1', 'missed 2', 'missed 3', 'live again']);
  assert.deepEqual(await lines(ann.page), await lines(bob.page));
  assert.deepEqual([...ann.problems, ...bob.problems], []);
  await ann.context.close();
  await bob.context.close();
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
