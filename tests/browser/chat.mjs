// The web client in a real browser (run by scripts/browser-test): a single-process chatoy on a
// fresh data directory, Debian's headless Chromium driven by playwright-core, two users in two
// browser contexts. They register, one creates two rooms and the other joins, they chat both
// ways; bob goes offline, writes while offline (pending) and comes back to what he missed, in
// the room on screen and, through the per-room `since` of his `auth`, in the other one; the server
// restarts (1001) and both reconnect by themselves; bob reloads and pages back through history.
// Screenshots of the room view go to $CHATOY_ARTIFACTS. Any failure exits non-zero; the server
// and the browser are stopped in every case.

import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (run scripts/browser-test)`);
  return value;
};
const BIN = env("CHATOY_BIN");
const CHROMIUM = env("CHATOY_CHROMIUM");
const ARTIFACTS = env("CHATOY_ARTIFACTS");
const require = createRequire(path.join(env("CHATOY_PLAYWRIGHT_DIR"), "package.json"));
const { chromium } = require("playwright-core");

const WAIT = 10_000;
const PASSWORD = "correct horse battery";
const started = Date.now();
const log = (...args) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s]`, ...args);

// ---------------------------------------------------------------------------------------------
// The server: started, stopped with SIGTERM (the gateway closes sockets with 1001), restarted on
// the same port and data.

fs.mkdirSync(ARTIFACTS, { recursive: true });
const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "chatoy-browser-"));
const serverLog = fs.openSync(path.join(ARTIFACTS, "server.log"), "a");
let server = null;

function startServer(port) {
  return new Promise((resolve, reject) => {
    const child = spawn(
      BIN,
      ["standalone", "--data-dir", dataDir, "--listen", `127.0.0.1:${port}`,
       "--argon2-memory-kib", "1024", "--argon2-iterations", "1"],
      { stdio: ["ignore", "pipe", serverLog] },
    );
    server = child;
    let out = "";
    const timer = setTimeout(() => reject(new Error("chatoy did not start within 30 s")), 30_000);
    child.stdout.on("data", (chunk) => {
      out += chunk;
      fs.appendFileSync(path.join(ARTIFACTS, "server.log"), chunk);
      const m = /chatoy listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`chatoy exited with ${code} before listening`));
    });
  });
}

function stopServer() {
  const child = server;
  server = null;
  if (!child || child.exitCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const kill = setTimeout(() => child.kill("SIGKILL"), 15_000);
    child.on("exit", () => {
      clearTimeout(kill);
      resolve();
    });
    child.kill("SIGTERM");
  });
}

process.on("exit", () => {
  if (server && server.exitCode === null) server.kill("SIGKILL");
  fs.rmSync(dataDir, { recursive: true, force: true });
});
// Interrupted (Ctrl-C, the script's timeout): the exit handlers above and playwright's stop the
// server and the browser.
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(signal, () => {
    console.error(`browser test interrupted (${signal})`);
    process.exit(1);
  });
}

// ---------------------------------------------------------------------------------------------
// Page helpers.

const errors = [];

async function newUser(browser, base, name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 680 } });
  const page = await context.newPage();
  page.on("pageerror", (err) => errors.push(`${name}: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") log(`${name} console ${msg.type()}: ${msg.text()}`);
  });
  await page.goto(base);
  await page.getByLabel("Username").fill(name);
  await page.getByLabel("Password", { exact: true }).fill(PASSWORD);
  await page.getByRole("button", { name: "Register" }).click();
  await page.locator("#chat-view").waitFor({ state: "visible", timeout: WAIT });
  await connState(page, "online");
  return { context, page, name };
}

/** Collects the `auth` frames the page sends, parsed, on every WebSocket it opens. */
function recordAuths(page) {
  const auths = [];
  page.on("websocket", (ws) => {
    ws.on("framesent", ({ payload }) => {
      try {
        const frame = JSON.parse(payload);
        if (frame.type === "auth") auths.push(frame);
      } catch {
        // Not JSON: not an auth frame.
      }
    });
  });
  return auths;
}

async function openRoom(page, id, name) {
  await page.locator(`#rooms button[data-room="${id}"]`).click();
  await page.locator("#room-title", { hasText: name }).waitFor({ timeout: WAIT });
}

async function connState(page, state) {
  await page.waitForFunction((s) => document.getElementById("conn").dataset.state === s, state, { timeout: WAIT * 2 });
}

async function send(page, text) {
  await page.getByLabel("Message", { exact: true }).fill(text);
  await page.getByLabel("Message", { exact: true }).press("Enter");
}

function message(page, text, status) {
  const selector = status ? `#messages li[data-status="${status}"]` : "#messages li";
  return page.locator(selector, { hasText: text });
}

async function seen(page, text, status = "sent") {
  await message(page, text, status).waitFor({ timeout: WAIT });
}

/** The texts of the room view in display order, and whether every uuid is shown once. */
async function shown(page) {
  return page.evaluate(() => {
    const items = [...document.querySelectorAll("#messages li")];
    const uuids = items.map((li) => li.dataset.uuid);
    return {
      texts: items.map((li) => li.querySelector(".text").textContent),
      unique: new Set(uuids).size === uuids.length,
      sentOrder: items.every((li, i) => i === 0 || (items[i - 1].querySelector(".meta").title || "") <= (li.querySelector(".meta").title || "~")),
    };
  });
}

function assert(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`);
}

function sameKeys(a, b) {
  return JSON.stringify([...a].sort()) === JSON.stringify([...b].sort());
}

function sameList(a, b, what) {
  assert(JSON.stringify(a) === JSON.stringify(b), `${what}:\n  ${JSON.stringify(a)}\n  ${JSON.stringify(b)}`);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });
}

// ---------------------------------------------------------------------------------------------

async function main() {
  let port = await startServer(0);
  const base = `http://127.0.0.1:${port}/`;
  log(`chatoy on ${base}`);
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
  try {
    const alice = await newUser(browser, base, "alice");
    const bob = await newUser(browser, base, "bob");
    log("alice and bob registered and connected");

    // Alice creates the room; bob joins it by its id.
    await alice.page.getByLabel("New room").fill("lobby");
    await alice.page.getByRole("button", { name: "Create" }).click();
    await alice.page.locator("#room-title", { hasText: "lobby" }).waitFor({ timeout: WAIT });
    const info = await alice.page.locator("#room-info").textContent();
    const room = /Room id (\d+)/.exec(info)[1];
    await bob.page.getByLabel("Join room by id").fill(room);
    await bob.page.getByRole("button", { name: "Join" }).click();
    await bob.page.locator("#room-title", { hasText: "lobby" }).waitFor({ timeout: WAIT });
    log(`room ${room}: alice created it, bob joined`);

    // Both ways.
    await send(alice.page, "Hi Bob! Welcome to the lobby.");
    await seen(alice.page, "Hi Bob!", "sent");
    await seen(bob.page, "Hi Bob!");
    await send(bob.page, "Hello Alice, glad to be here.");
    await seen(bob.page, "Hello Alice", "sent");
    await seen(alice.page, "Hello Alice");
    log("messages both ways");

    // A second room, with one message bob sees: it gives him a resume point there.
    await alice.page.getByLabel("New room").fill("side");
    await alice.page.getByRole("button", { name: "Create" }).click();
    await alice.page.locator("#room-title", { hasText: "side" }).waitFor({ timeout: WAIT });
    const side = /Room id (\d+)/.exec(await alice.page.locator("#room-info").textContent())[1];
    await bob.page.getByLabel("Join room by id").fill(side);
    await bob.page.getByRole("button", { name: "Join" }).click();
    await bob.page.locator("#room-title", { hasText: "side" }).waitFor({ timeout: WAIT });
    await send(alice.page, "The side room is open.");
    await seen(bob.page, "side room is open");
    await openRoom(alice.page, room, "lobby");
    await openRoom(bob.page, room, "lobby");
    const bobAuths = recordAuths(bob.page);
    log(`room ${side}: a second room, bob has seen its first message`);

    // Bob goes offline and writes: his message waits, pending. Alice writes meanwhile.
    await bob.context.setOffline(true);
    await connState(bob.page, "offline");
    await send(bob.page, "Writing this on the train, offline…");
    await seen(bob.page, "on the train", "pending");
    await shot(bob.page, "bob-offline-pending");
    await openRoom(alice.page, side, "side");
    await send(alice.page, "A side note while bob is away.");
    await seen(alice.page, "side note", "sent");
    await openRoom(alice.page, room, "lobby");
    await send(alice.page, "Did you get the agenda for tomorrow?");
    await send(alice.page, "It is in the shared folder.");
    await seen(alice.page, "shared folder", "sent");
    log("bob offline with a pending message; alice sent two");

    // Back online: bob reconnects with `since`, gets what he missed, and his message is sent.
    await bob.context.setOffline(false);
    await connState(bob.page, "online");
    await seen(bob.page, "agenda for tomorrow");
    await seen(bob.page, "shared folder");
    await seen(bob.page, "on the train", "sent");
    await seen(alice.page, "on the train");
    const a = await shown(alice.page);
    const b = await shown(bob.page);
    sameList(b.texts, a.texts, "both see the same messages in the same order");
    assert(a.unique && b.unique, "each message shown once");
    assert(a.sentOrder && b.sentOrder, "ordered by sent");
    await send(alice.page, "Great, see you at 10!");
    await seen(bob.page, "see you at 10");
    await seen(alice.page, "see you at 10", "sent");
    await shot(alice.page, "room-view");
    await shot(bob.page, "bob-back-online");
    log("bob back online: saw what he missed, his pending message went out");

    // The side room's message came through the `since` replay: bob's page reads only the room
    // on screen from history. His `auth` listed each room with the last `sent` he saw there.
    const resumed = bobAuths.find((frame) => frame.since !== undefined);
    assert(resumed, `bob resumed with since: ${JSON.stringify(bobAuths)}`);
    const since = resumed.since;
    assert(
      typeof since === "object" && !Array.isArray(since) &&
        sameKeys(Object.keys(since), [room, side]) && Object.values(since).every((t) => typeof t === "string"),
      `since is a map of both rooms: ${JSON.stringify(since)}`,
    );
    await bob.page.locator(`#rooms button[data-room="${side}"] .unread`, { hasText: "1" }).waitFor({ timeout: WAIT });
    await openRoom(bob.page, side, "side");
    await seen(bob.page, "side note");
    sameList((await shown(bob.page)).texts, ["The side room is open.", "A side note while bob is away."], "the side room");
    await openRoom(bob.page, room, "lobby");
    log("bob's other room: its missed message came through the per-room since");

    // The server restarts (it closes the sockets with 1001): both reconnect by themselves.
    await stopServer();
    await connState(alice.page, "reconnecting");
    port = await startServer(port);
    await connState(alice.page, "online");
    await connState(bob.page, "online");
    await send(bob.page, "Still here after the restart.");
    await seen(alice.page, "after the restart");
    await seen(bob.page, "after the restart", "sent");
    log("server restarted; both reconnected");

    // Enough messages for more than one history page; bob reloads (the session is kept) and
    // scrolls back with "Load older messages".
    for (let i = 1; i <= 60; i += 1) await send(alice.page, `Message number ${i}`);
    await seen(alice.page, "Message number 60", "sent");
    await seen(bob.page, "Message number 60");
    await bob.page.reload();
    await connState(bob.page, "online");
    await seen(bob.page, "Message number 60");
    const older = bob.page.getByRole("button", { name: "Load older messages" });
    await older.waitFor({ state: "visible", timeout: WAIT });
    const firstPage = (await shown(bob.page)).texts.length;
    assert(firstPage === 50, `one page of 50 after the reload, got ${firstPage}`);
    // A click by Playwright would first scroll the button, at the top of the list, into view;
    // reaching the top loads the older page by itself (as for a user who scrolls back) and hides
    // the button, racing the click. So the button is clicked where it is, without scrolling.
    await older.evaluate((button) => button.click());
    await bob.page.locator("#history-start").waitFor({ state: "visible", timeout: WAIT });
    const all = await shown(bob.page);
    const total = (await shown(alice.page)).texts.length;
    assert(all.texts.length === total, `all ${total} messages after paging back, got ${all.texts.length}`);
    sameList(all.texts, (await shown(alice.page)).texts, "history paged back matches what alice saw live");
    assert(all.unique && all.sentOrder, "paged history unique and in order");
    await shot(bob.page, "bob-history");
    log(`history: ${firstPage} then ${all.texts.length} after paging back`);

    assert(errors.length === 0, `no uncaught page errors: ${errors.join("; ")}`);
  } finally {
    await browser.close();
    await stopServer();
  }
}

main().then(
  () => {
    log("browser test passed");
    process.exit(0);
  },
  (err) => {
    console.error(`browser test FAILED: ${err.stack || err}`);
    process.exit(1);
  },
);
