// The Chatoy web client: two ES modules, no framework, no build step. It speaks the protocol of
// docs/PROTOCOL.md the way docs/client-guide.md describes: HTTP for accounts, rooms and history;
// one WebSocket for `auth`, `msg` -> `send` acks and live `recv`; messages are identified by
// uuid (de-duplicated), ordered by `sent`, resent with the same uuid after codes 4 and 5 or a
// lost connection; the socket reconnects with jittered backoff and a per-room `since`: for each
// room, the newest `sent` seen in it. Its state and pure helpers are in model.js.

import { HISTORY_PAGE, SESSION_KEY, jitter, newUuid, noteSent, sinceMap, state, tsKey } from "/model.js";

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// HTTP API.

class ApiError extends Error {
  constructor(status, msg) {
    super(msg);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "the server cannot be reached");
  }
  let json = null;
  try {
    json = await res.json();
  } catch {
    // Not JSON: the status says enough.
  }
  if (!res.ok) {
    if (res.status === 401 && state.token && path !== "/login") {
      endSession("Your session expired: log in again.");
    }
    throw new ApiError(res.status, (json && json.msg) || `HTTP ${res.status}`);
  }
  return json;
}

// ---------------------------------------------------------------------------------------------
// Connection state and the WebSocket.

let ws = null;
let authed = false;
let attempt = 0;
let reconnectTimer = null;
let countdownTimer = null;

function setConn(kind, text) {
  const el = $("conn");
  el.dataset.state = kind;
  el.textContent = text;
}

function connect() {
  clearTimeout(reconnectTimer);
  clearInterval(countdownTimer);
  if (!state.token || ws) return;
  if (!navigator.onLine) {
    setConn("offline", "Offline: waiting for the network");
    return;
  }
  setConn("connecting", "Connecting…");
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  const sock = new WebSocket(url);
  ws = sock;
  authed = false;
  sock.onopen = () => {
    const frame = { type: "auth", token: state.token };
    const since = sinceMap();
    if (since) frame.since = since;
    sock.send(JSON.stringify(frame));
  };
  sock.onmessage = (event) => {
    if (sock !== ws) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    onFrame(frame);
  };
  sock.onclose = (event) => {
    if (sock !== ws) return;
    ws = null;
    authed = false;
    onDrop(event.code);
  };
}

function disconnect() {
  clearTimeout(reconnectTimer);
  clearInterval(countdownTimer);
  const sock = ws;
  ws = null;
  authed = false;
  if (sock) sock.close(1000);
}

/** A lost connection: reconnect after a jittered, growing delay (short after a 1001 drain). */
function onDrop(code) {
  if (!state.token) return;
  if (!navigator.onLine) {
    setConn("offline", "Offline: waiting for the network");
    return;
  }
  const base = code === 1001 ? 500 : Math.min(30000, 1000 * 2 ** attempt);
  attempt += 1;
  const delay = jitter(base);
  const until = Date.now() + delay;
  const show = () => {
    const secs = Math.max(0, Math.ceil((until - Date.now()) / 1000));
    setConn("reconnecting", `Reconnecting in ${secs} s…`);
  };
  show();
  countdownTimer = setInterval(show, 1000);
  reconnectTimer = setTimeout(connect, delay);
}

function onFrame(frame) {
  switch (frame.type) {
    case "auth":
      if (frame.code === 0) {
        authed = true;
        attempt = 0;
        setConn("online", "Connected");
        // Everything unacknowledged goes again with its own uuid: the server stores it once.
        for (const p of state.pending.values()) if (!p.timer) transmit(p);
        refreshRooms();
        if (state.current !== null) loadNewest(state.current);
      } else if (frame.code === 1) {
        endSession("Your session expired: log in again.");
      }
      break;
    case "send":
      onAck(frame);
      break;
    case "recv":
      onRecv(frame.data);
      break;
    case "error":
      console.warn("chatoy: the server did not understand a frame:", frame.msg);
      break;
    default:
      break;
  }
}

function transmit(p) {
  if (!ws || !authed) return;
  ws.send(JSON.stringify({ type: "msg", uuid: p.uuid, room: p.room, data: { type: "Text", text: p.text } }));
}

function onAck(frame) {
  const p = state.pending.get(frame.uuid);
  if (!p) return;
  if (frame.code === 0) {
    state.pending.delete(p.uuid);
    upsert({ uuid: p.uuid, sender: state.user.id, room: p.room, text: p.text, sent: frame.sent, status: "sent" });
  } else if (frame.code === 4 || frame.code === 5) {
    // Rate limited or temporarily unavailable: the same uuid again, later.
    p.attempts += 1;
    const delay = jitter(Math.min(10000, 500 * 2 ** p.attempts));
    upsert({ ...messageOf(p), status: "retrying" });
    p.timer = setTimeout(() => {
      p.timer = null;
      transmit(p);
    }, delay);
  } else if (frame.code === 1) {
    // Not authenticated (yet): the next successful `auth` resends it.
  } else {
    state.pending.delete(p.uuid);
    upsert({ ...messageOf(p), status: "failed", error: frame.msg || `code ${frame.code}` });
  }
}

function onRecv(data) {
  if (!data || typeof data.uuid !== "string") return;
  noteSent(data.room, data.sent);
  // Our own message, replayed by `since` after its ack was lost: it is stored.
  const p = state.pending.get(data.uuid);
  if (p) {
    clearTimeout(p.timer);
    state.pending.delete(data.uuid);
  }
  const fresh = upsert({ ...fromWire(data), status: "sent" });
  if (!state.rooms.has(data.room)) refreshRooms();
  if (fresh && data.room === state.current) {
    announce(data);
  } else if (fresh && data.room !== state.current && state.rooms.has(data.room)) {
    state.rooms.get(data.room).unread += 1;
    renderRooms();
  }
}

function messageOf(p) {
  return { uuid: p.uuid, sender: state.user.id, room: p.room, text: p.text, sent: null };
}

function fromWire(m) {
  const text = m.data && m.data.type === "Text" ? m.data.text : `[${(m.data && m.data.type) || "unknown"} message]`;
  return { uuid: m.uuid, sender: m.sender, room: m.room, text, sent: m.sent };
}

// ---------------------------------------------------------------------------------------------
// Messages: stored by room and uuid, shown in `sent` order (unacknowledged ones last).

/** Adds or updates a message; returns whether it was new. */
function upsert(msg) {
  let room = state.messages.get(msg.room);
  if (!room) {
    room = new Map();
    state.messages.set(msg.room, room);
  }
  const old = room.get(msg.uuid);
  // A stored copy (with `sent`) always wins over a local pending one.
  if (old && old.sent && !msg.sent) return false;
  const merged = { ...old, ...msg, key: msg.sent ? tsKey(msg.sent) : null };
  if (merged.status === "sent") merged.error = undefined;
  room.set(msg.uuid, merged);
  if (msg.room === state.current) renderMessage(merged);
  return !old;
}

function compare(a, b) {
  if (a.key === null || b.key === null) {
    if (a.key === b.key) return 0;
    return a.key === null ? 1 : -1;
  }
  if (a.key !== b.key) return a.key < b.key ? -1 : 1;
  return a.uuid < b.uuid ? -1 : a.uuid > b.uuid ? 1 : 0;
}

function nameOf(id) {
  if (state.user && id === state.user.id) return state.user.username;
  const known = state.names.get(id);
  if (known) return known;
  state.names.set(id, `user ${id}`);
  fetch(`/users/${id}`)
    .then((res) => (res.ok ? res.json() : null))
    .then((user) => {
      if (!user) return;
      state.names.set(id, user.username);
      for (const el of document.querySelectorAll(`.sender[data-id="${id}"]`)) el.textContent = user.username;
    })
    .catch(() => {});
  return state.names.get(id);
}

const STATUS_TEXT = { pending: "sending…", retrying: "retrying…", sent: "", failed: "not sent" };

function renderMessage(msg) {
  const list = $("messages");
  const id = `m-${msg.uuid}`;
  let li = document.getElementById(id);
  const scroller = $("scroller");
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  if (!li) {
    li = document.createElement("li");
    li.id = id;
    li.dataset.uuid = msg.uuid;
    li.innerHTML = '<span class="meta"></span><span class="sender"></span><span class="text"></span><span class="status"></span>';
  }
  li.classList.toggle("mine", !!state.user && msg.sender === state.user.id);
  li.dataset.status = msg.status || "sent";
  const meta = li.querySelector(".meta");
  if (msg.sent) {
    const at = new Date(msg.sent);
    meta.textContent = at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    meta.title = msg.sent;
  } else {
    meta.textContent = "--:--";
  }
  const sender = li.querySelector(".sender");
  sender.dataset.id = msg.sender;
  sender.textContent = nameOf(msg.sender);
  li.querySelector(".text").textContent = msg.text;
  const status = li.querySelector(".status");
  const mine = !!state.user && msg.sender === state.user.id;
  status.textContent = msg.status === "failed" ? `not sent: ${msg.error}` : STATUS_TEXT[msg.status] || "";
  if (mine && msg.status === "sent") status.textContent = "✓ sent";
  // Insert (or move) the node before the first message that sorts after it.
  const room = state.messages.get(msg.room);
  let before = null;
  for (const node of list.children) {
    if (node === li) continue;
    const other = room.get(node.dataset.uuid);
    if (other && compare(msg, other) < 0) {
      before = node;
      break;
    }
  }
  if (li.parentNode !== list || li.nextSibling !== before) list.insertBefore(li, before);
  if (atBottom) scroller.scrollTop = scroller.scrollHeight;
}

function announce(data) {
  if (state.user && data.sender === state.user.id) return;
  $("announcer").textContent = `${nameOf(data.sender)}: ${fromWire(data).text}`;
}

// ---------------------------------------------------------------------------------------------
// Rooms and history.

async function refreshRooms() {
  try {
    const rooms = await api("GET", "/rooms/me");
    for (const room of rooms) {
      const known = state.rooms.get(room.id);
      state.rooms.set(room.id, { id: room.id, name: room.name, unread: known ? known.unread : 0 });
    }
    renderRooms();
    if (state.current !== null) showRoomHeader();
  } catch (err) {
    $("rooms-error").textContent = `Cannot list the rooms: ${err.message}`;
  }
}

function renderRooms() {
  const ul = $("rooms");
  ul.replaceChildren();
  const rooms = [...state.rooms.values()].sort((a, b) => a.name.localeCompare(b.name) || a.id - b.id);
  for (const room of rooms) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.room = room.id;
    button.textContent = room.name;
    if (room.id === state.current) button.setAttribute("aria-current", "true");
    if (room.unread > 0) {
      const badge = document.createElement("span");
      badge.className = "unread";
      badge.textContent = room.unread;
      badge.setAttribute("aria-label", `${room.unread} unread`);
      button.append(" ", badge);
    }
    button.addEventListener("click", () => {
      location.hash = `room=${room.id}`;
    });
    li.append(button);
    ul.append(li);
  }
}

function showRoomHeader() {
  const room = state.rooms.get(state.current);
  $("room-title").textContent = room ? room.name : `Room ${state.current}`;
  $("room-info").textContent = `Room id ${state.current}: others join it with this number.`;
}

function openRoom(id) {
  state.current = id;
  const room = state.rooms.get(id);
  if (room) room.unread = 0;
  renderRooms();
  showRoomHeader();
  $("send-form").hidden = false;
  const list = $("messages");
  list.replaceChildren();
  const msgs = [...(state.messages.get(id) || new Map()).values()].sort(compare);
  for (const msg of msgs) renderMessage(msg);
  updateHistoryControls();
  $("scroller").scrollTop = $("scroller").scrollHeight;
  if (!state.history.has(id)) loadNewest(id);
}

function updateHistoryControls() {
  const h = state.history.get(state.current);
  $("older").hidden = !h || h.done;
  $("history-start").hidden = !h || !h.done;
}

function mergePage(room, page) {
  for (const m of page) {
    noteSent(room, m.sent);
    upsert({ ...fromWire(m), status: "sent" });
  }
}

/** The newest page: on opening a room and after every reconnect (closes any gap). */
async function loadNewest(room) {
  try {
    const page = await api("GET", `/rooms/${room}/messages?limit=${HISTORY_PAGE}`);
    mergePage(room, page);
    if (!state.history.has(room)) {
      state.history.set(room, {
        oldest: page.length ? page[page.length - 1].sent : null,
        done: page.length < HISTORY_PAGE,
      });
    }
    if (room === state.current) updateHistoryControls();
  } catch (err) {
    if (room === state.current) $("room-info").textContent = `Cannot load the history: ${err.message}`;
  }
}

let loadingOlder = false;

/** One page older than the oldest loaded message, keeping the view where it was. */
async function loadOlder() {
  const room = state.current;
  const h = state.history.get(room);
  if (!h || h.done || loadingOlder || !h.oldest) return;
  loadingOlder = true;
  try {
    const scroller = $("scroller");
    const fromBottom = scroller.scrollHeight - scroller.scrollTop;
    const page = await api(
      "GET",
      `/rooms/${room}/messages?limit=${HISTORY_PAGE}&before=${encodeURIComponent(h.oldest)}`,
    );
    if (room !== state.current) return;
    mergePage(room, page);
    if (page.length) h.oldest = page[page.length - 1].sent;
    h.done = page.length < HISTORY_PAGE;
    updateHistoryControls();
    scroller.scrollTop = scroller.scrollHeight - fromBottom;
  } catch (err) {
    $("room-info").textContent = `Cannot load older messages: ${err.message}`;
  } finally {
    loadingOlder = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Session.

function saveSession() {
  localStorage.setItem(SESSION_KEY, JSON.stringify({ token: state.token, user: state.user }));
}

function startSession() {
  $("auth-view").hidden = true;
  $("chat-view").hidden = false;
  $("logout").hidden = false;
  $("whoami").textContent = `Logged in as ${state.user.username}`;
  connect();
  refreshRooms().then(routeFromHash);
}

function endSession(why) {
  state.token = null;
  state.user = null;
  localStorage.removeItem(SESSION_KEY);
  disconnect();
  for (const p of state.pending.values()) clearTimeout(p.timer);
  state.pending.clear();
  state.rooms.clear();
  state.messages.clear();
  state.history.clear();
  state.current = null;
  state.lastSent.clear();
  $("messages").replaceChildren();
  $("rooms").replaceChildren();
  $("chat-view").hidden = true;
  $("logout").hidden = true;
  $("auth-view").hidden = false;
  $("whoami").textContent = "";
  $("auth-error").textContent = why || "";
  setConn("offline", "Not connected");
}

function routeFromHash() {
  const m = /^#room=(\d+)$/.exec(location.hash);
  if (m && state.token) openRoom(Number(m[1]));
}

// ---------------------------------------------------------------------------------------------
// Wiring.

$("auth-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const action = event.submitter ? event.submitter.value : "login";
  const username = $("username").value.trim();
  const password = $("password").value;
  $("auth-error").textContent = "";
  try {
    if (action === "register") await api("POST", "/users", { username, password });
    const reply = await api("POST", "/login", { username, password });
    state.token = reply.msg;
    state.user = reply.user;
    saveSession();
    $("password").value = "";
    startSession();
  } catch (err) {
    $("auth-error").textContent = err.status === 409 ? "That username is taken." : err.message;
  }
});

$("logout").addEventListener("click", async () => {
  try {
    await api("POST", "/logout");
  } catch {
    // Logged out here either way.
  }
  endSession("");
});

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("rooms-error").textContent = "";
  try {
    const { id } = await api("POST", "/rooms", { name: $("room-name").value.trim() });
    $("room-name").value = "";
    await refreshRooms();
    location.hash = `room=${id}`;
  } catch (err) {
    $("rooms-error").textContent = `Cannot create the room: ${err.message}`;
  }
});

$("join-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("rooms-error").textContent = "";
  const id = Number($("room-join").value.trim());
  try {
    await api("POST", `/rooms/${id}/join`);
    $("room-join").value = "";
    await refreshRooms();
    location.hash = `room=${id}`;
  } catch (err) {
    $("rooms-error").textContent = `Cannot join room ${id}: ${err.message}`;
  }
});

$("send-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim() || state.current === null) return;
  const p = { uuid: newUuid(), room: state.current, text, attempts: 0, timer: null };
  state.pending.set(p.uuid, p);
  upsert({ ...messageOf(p), status: "pending" });
  transmit(p);
  $("text").value = "";
  $("scroller").scrollTop = $("scroller").scrollHeight;
});

$("text").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("send-form").requestSubmit();
  }
});

$("older").addEventListener("click", loadOlder);
$("scroller").addEventListener("scroll", () => {
  if ($("scroller").scrollTop === 0) loadOlder();
});
window.addEventListener("hashchange", routeFromHash);
// The browser knows before the socket does: drop at once when offline, reconnect when back.
window.addEventListener("offline", () => {
  disconnect();
  if (state.token) setConn("offline", "Offline: waiting for the network");
});
window.addEventListener("online", () => {
  attempt = 0;
  connect();
});

const saved = (() => {
  try {
    return JSON.parse(localStorage.getItem(SESSION_KEY) || "null");
  } catch {
    return null;
  }
})();
if (saved && saved.token && saved.user) {
  state.token = saved.token;
  state.user = saved.user;
  startSession();
}
