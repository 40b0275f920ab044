// The page's client of /v1: every request goes to this page's own origin (and nowhere else), with the signed-in
// user's bearer token; errors come back as ApiError with the server's message and, where it names one, the field.

const TOKEN_KEY = "stablediff.token";

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || null;
  }
}

export const token = {
  get: () => localStorage.getItem(TOKEN_KEY),
  set: (value) => localStorage.setItem(TOKEN_KEY, value),
  clear: () => localStorage.removeItem(TOKEN_KEY),
};

// A path of this server's, as a URL; anything on another origin is refused, so credentials cannot leave it.
function own(path) {
  const url = new URL(path, location.origin);
  if (url.origin !== location.origin || !url.pathname.startsWith("/v1/")) {
    throw new ApiError(0, `refused to send a request to ${url.origin}${url.pathname}: the page only talks to /v1 here`);
  }
  return url;
}

export async function request(method, path, { body, headers = {}, cache = "no-store" } = {}) {
  const t = token.get();
  const init = { method, cache, credentials: "omit", redirect: "error",
                 headers: { ...(t ? { Authorization: `Bearer ${t}` } : {}), ...headers } };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(own(path), init);
  } catch (e) {
    if (e instanceof ApiError) throw e;
    throw new ApiError(0, "the server cannot be reached: is `stablediff serve` still running?");
  }
  if (!response.ok) {
    let data = {};
    try { data = await response.json(); } catch { /* not JSON: the status says it */ }
    throw new ApiError(response.status, data.error || `${response.status} ${response.statusText}`, data.field);
  }
  return response;
}

export const get = async (path) => (await request("GET", path)).json();
export const post = async (path, body) => (await request("POST", path, { body })).json();
export const del = async (path) => (await request("DELETE", path)).json();

function basic(user, password) {
  const bytes = new TextEncoder().encode(`${user}:${password}`);
  return "Basic " + btoa(String.fromCharCode(...bytes));
}

// Sign in once with the user's password; from then on only the token is sent (the password is not kept).
export async function signIn(user, password) {
  const response = await request("POST", "/v1/tokens", { headers: { Authorization: basic(user, password) } });
  const data = await response.json();
  token.set(data.token);
  return data;
}

export async function signOut() {
  try { await del("/v1/tokens"); } finally { token.clear(); }
}

// An image of the server's, fetched once with the token (an <img src> cannot send it): the Blob, and a blob: URL to
// show it by.
const images = new Map();
function cached(path) {
  if (!images.has(path)) {
    // the server's images never change once written: the browser may keep them (the server says for how long)
    const entry = request("GET", path, { cache: "default" }).then((r) => r.blob()).then((blob) => ({ blob, url: URL.createObjectURL(blob) }));
    images.set(path, entry);
    entry.catch(() => images.delete(path));
  }
  return images.get(path);
}
export const imageURL = async (path) => (await cached(path)).url;
export const imageBlob = async (path) => (await cached(path)).blob;

// Server-Sent Events read from a fetch stream (EventSource cannot send the token): yields {event, data}.
export async function* events(path) {
  const response = await request("GET", path, { headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { event, data: data ? JSON.parse(data) : null };
    }
  }
}
