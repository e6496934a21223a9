// The web client's model: what the page knows (`state`), and the protocol's pure helpers it
// needs — RFC 3339 sort keys, the per-room `since` of the next `auth` (docs/client-guide.md §4),
// uuids and reconnect jitter. No DOM and no I/O here; app.js imports it.

export const HISTORY_PAGE = 50;
/** Most rooms one `since` may list (docs/PROTOCOL.md); a longer map is refused. */
export const MAX_SINCE_ROOMS = 1000;
export const SESSION_KEY = "chatoy.session";

/** Everything the page knows. */
export const state = {
  /** The token and the user of `POST /login`, or null when logged out. */
  token: null,
  user: null,
  /** Room id -> {id, name, unread}. */
  rooms: new Map(),
  /** The open room's id, or null. */
  current: null,
  /** Room id -> Map(uuid -> message) with message = {uuid, sender, room, text, sent, key, status, error}. */
  messages: new Map(),
  /** Room id -> {oldest: sent of the oldest loaded message, done: no older page exists}. */
  history: new Map(),
  /** uuid -> {uuid, room, text, attempts, timer}: sent but not acknowledged with code 0. */
  pending: new Map(),
  /** Room id -> {sent, key}: the newest `sent` received in the room (text and sort key), the
   *  per-room `since` of the next `auth`. Acks do not count: a message of the room with an
   *  earlier `sent` may still be on its way. */
  lastSent: new Map(),
  /** User id -> username. */
  names: new Map(),
};

// ---------------------------------------------------------------------------------------------
// Timestamps: RFC 3339 with up to nine fractional digits and any offset. JavaScript dates stop
// at milliseconds, so the sort key is a BigInt of nanoseconds since the epoch.

export function tsKey(text) {
  const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/i.exec(text || "");
  if (!m) return null;
  const ms = Date.parse(m[1] + m[3]);
  if (Number.isNaN(ms)) return null;
  const frac = (m[2] || "").padEnd(9, "0").slice(0, 9);
  return BigInt(ms) * 1000000n + BigInt(frac);
}

export function noteSent(room, sent) {
  const key = tsKey(sent);
  const last = state.lastSent.get(room);
  if (key !== null && (!last || key > last.key)) state.lastSent.set(room, { sent, key });
}

/** The `since` of the next `auth`: room id -> newest `sent` received in it, for at most
 *  MAX_SINCE_ROOMS rooms (the most recently active); null if no room has one. A room left out
 *  gets no replay, so it is read from history again when it is opened (client guide §4). */
export function sinceMap() {
  if (state.lastSent.size === 0) return null;
  const newest = [...state.lastSent].sort(([, a], [, b]) => (a.key > b.key ? -1 : a.key < b.key ? 1 : 0));
  for (const [room] of newest.slice(MAX_SINCE_ROOMS)) state.history.delete(room);
  return Object.fromEntries(newest.slice(0, MAX_SINCE_ROOMS).map(([room, last]) => [String(room), last.sent]));
}

export function newUuid() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // Pages served over plain HTTP from another host are not a secure context: no randomUUID.
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Equal jitter: half the delay fixed, half random, so clients that dropped together spread out. */
export function jitter(ms) {
  return ms / 2 + Math.random() * (ms / 2);
}
