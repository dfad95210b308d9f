// emote-live browser client: avatar picker, portrait upload, and one WebRTC session signaled over /ws.
//
// Session states: idle -> starting (microphone, then WebSocket + ICE gathering + offer) -> live (answer applied)
// -> idle again on Stop, on a server "closed"/"error" message, on ICE failure or when the WebSocket drops.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  video: $("video"), placeholder: $("placeholder"), unmute: $("unmute"), status: $("status"), mode: $("mode"),
  start: $("start"), stop: $("stop"), interrupt: $("interrupt"),
  fps: $("stat-fps"), rtt: $("stat-rtt"), lip: $("stat-lip"),
  tokenBox: $("token-box"), token: $("token"), saveToken: $("save-token"),
  avatars: $("avatars"), deleteAvatar: $("delete-avatar"),
  upload: $("upload"), uploadImage: $("upload-image"), uploadName: $("upload-name"), uploadButton: $("upload-button"),
};

const TOKEN_KEY = "emote-live.token";
const ICE_GATHER_TIMEOUT_MS = 4000; // send what we have: an unreachable STUN/TURN server must not hang Start
const CONNECT_TIMEOUT_MS = 20000;

let config = { ice_servers: [], auth_required: false, authorized: true, max_upload_bytes: 10 * 2 ** 20 };
let avatarList = [];
let selectedAvatar = "default";
let session = null; // the live session's resources, see start()
let state = "idle";

// ---- helpers --------------------------------------------------------------------------------------------------

function setStatus(text, kind = "info") {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind;
}

function setState(next) {
  state = next;
  document.body.dataset.state = next;
  ui.start.disabled = next !== "idle";
  ui.stop.disabled = next === "idle";
  ui.interrupt.disabled = next !== "live";
  ui.mode.disabled = next !== "idle";
  ui.avatars.querySelectorAll("input").forEach((input) => { input.disabled = next !== "idle"; });
  updateDeleteButton();
}

function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  return token() ? { Authorization: `Bearer ${token()}` } : {};
}

// `emote serve` prints the page's URL with #token=…: keep the token and take it out of the address bar (and so out
// of bookmarks and screenshots). A fragment never reaches the server, so it is in no access log either.
function takeTokenFromUrl() {
  const params = new URLSearchParams(location.hash.slice(1));
  const value = params.get("token");
  if (value === null) return;
  localStorage.setItem(TOKEN_KEY, value.trim());
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.ok) {
    return response.status === 204 ? null : response.json();
  }
  let body = {};
  try { body = await response.json(); } catch { /* not JSON: keep the status line */ }
  throw new ApiError(response.status, body.error || "http_error", body.message || response.statusText);
}

// One sentence a person can act on, for every failure we know about.
function describeError(code, message, status) {
  if (code === "unauthorized" || status === 401) {
    showTokenBox();
    return token() ? "The access token was refused. Check it and save it again."
                   : "This server needs an access token. Enter it below and press Save.";
  }
  if (code === "server_full" || status === 503) {
    return "The server is busy: every session is in use. Please try again in a little while.";
  }
  if (code === "too_large" || status === 413) {
    return `That image is too large (the limit is ${Math.round(config.max_upload_bytes / 2 ** 20)} MB).`;
  }
  if (code === "rate_limited" || status === 429) {
    return "Too many requests from this address. Please wait a moment and try again.";
  }
  if (code === "quota_exceeded") return "The server's avatar storage is full. Delete an avatar first.";
  if (code === "forbidden_origin") return "The server refuses connections from this page's address (origin).";
  if (code === "bad_image") return `That image cannot be used: ${message}`;
  if (code === "unknown_avatar") return "That avatar no longer exists. Pick another one.";
  return message ? `Error: ${message}` : "Something went wrong.";
}

function showTokenBox() {
  ui.tokenBox.hidden = false;
  ui.token.value = token();
}

// ---- avatars --------------------------------------------------------------------------------------------------

// Portraits need the token, which an <img src> cannot send: fetch each once and show it as a blob: URL.
const portraits = new Map(); // avatar id -> Promise of a blob: URL ("" when it could not be fetched)

function portraitUrl(avatar) {
  if (!portraits.has(avatar.id)) {
    portraits.set(avatar.id, fetch(avatar.portrait_url, { headers: authHeaders() })
      .then((response) => (response.ok ? response.blob() : Promise.reject(new Error(`${response.status}`))))
      .then((blob) => URL.createObjectURL(blob))
      .catch(() => { portraits.delete(avatar.id); return ""; }));
  }
  return portraits.get(avatar.id);
}

function forgetPortraits(keep = []) {
  for (const [id, url] of [...portraits]) {
    if (keep.includes(id)) continue;
    portraits.delete(id);
    url.then((blobUrl) => blobUrl && URL.revokeObjectURL(blobUrl));
  }
}

async function loadAvatars() {
  try {
    avatarList = await api("/api/avatars");
  } catch (error) {
    setStatus(error instanceof ApiError ? describeError(error.code, error.message, error.status)
                                        : "Cannot reach the server.", "error");
    return;
  }
  forgetPortraits(avatarList.map((a) => a.id));
  if (!avatarList.some((a) => a.id === selectedAvatar)) {
    selectedAvatar = avatarList.length ? avatarList[0].id : "default";
  }
  renderAvatars();
}

function renderAvatars() {
  ui.avatars.replaceChildren();
  for (const avatar of avatarList) {
    const label = document.createElement("label");
    label.className = "avatar";
    const input = document.createElement("input");
    input.type = "radio";
    input.name = "avatar";
    input.value = avatar.id;
    input.checked = avatar.id === selectedAvatar;
    input.disabled = state !== "idle";
    input.addEventListener("change", () => { selectedAvatar = avatar.id; showPlaceholder(); updateDeleteButton(); });
    const img = document.createElement("img");
    img.alt = "";
    portraitUrl(avatar).then((url) => { if (url) img.src = url; });
    const name = document.createElement("span");
    name.textContent = avatar.name;
    label.append(input, img, name);
    ui.avatars.append(label);
  }
  showPlaceholder();
  updateDeleteButton();
}

function selectedInfo() {
  return avatarList.find((a) => a.id === selectedAvatar);
}

function showPlaceholder() {
  const info = selectedInfo();
  if (state === "idle" && info) {
    portraitUrl(info).then((url) => {
      if (url && state === "idle" && selectedAvatar === info.id) {
        ui.placeholder.src = url;
        ui.placeholder.hidden = false;
      }
    });
  }
}

function updateDeleteButton() {
  const info = selectedInfo();
  ui.deleteAvatar.disabled = state !== "idle" || !info || info.builtin;
}

async function uploadPortrait(event) {
  event.preventDefault();
  const file = ui.uploadImage.files[0];
  if (!file) return;
  if (file.size > config.max_upload_bytes) {
    setStatus(describeError("too_large"), "error");
    return;
  }
  const form = new FormData();
  form.append("image", file);
  if (ui.uploadName.value.trim()) form.append("name", ui.uploadName.value.trim());
  ui.uploadButton.disabled = true;
  setStatus("Uploading and preparing the portrait…");
  try {
    const info = await api("/api/avatars", { method: "POST", body: form });
    selectedAvatar = info.id;
    ui.upload.reset();
    await loadAvatars();
    setStatus(`Added “${info.name}”.`);
  } catch (error) {
    setStatus(error instanceof ApiError ? describeError(error.code, error.message, error.status)
                                        : "The upload failed: cannot reach the server.", "error");
  } finally {
    ui.uploadButton.disabled = false;
  }
}

async function deleteSelected() {
  const info = selectedInfo();
  if (!info || info.builtin || !confirm(`Delete the avatar “${info.name}”?`)) return;
  try {
    await api(`/api/avatars/${encodeURIComponent(info.id)}`, { method: "DELETE" });
    await loadAvatars();
    setStatus(`Deleted “${info.name}”.`);
  } catch (error) {
    setStatus(describeError(error.code, error.message, error.status), "error");
  }
}

// ---- session --------------------------------------------------------------------------------------------------

async function start() {
  if (state !== "idle") return;
  const mode = ui.mode.value;
  setState("starting");
  ui.unmute.hidden = true;
  session = { mode, pc: null, ws: null, mic: null, timers: [], lastFrames: null, ended: false };
  const current = session;

  if (mode === "mic") {
    setStatus("Asking for the microphone…");
    try {
      current.mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (error) {
      return fail(current, micMessage(error));
    }
    if (current.ended) return stopTracks(current.mic);
  }

  setStatus("Connecting…");
  // Fresh TURN credentials for this session (they are short-lived; the page may have been open for hours).
  config = await api("/api/config").catch(() => config);
  if (current.ended) return stopTracks(current.mic);
  const wsUrl = new URL("/ws", location.href);
  wsUrl.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (token()) wsUrl.searchParams.set("token", token()); // browsers cannot set headers on a WebSocket
  const ws = new WebSocket(wsUrl);
  current.ws = ws;
  ws.addEventListener("message", (event) => onSignal(current, event));
  ws.addEventListener("close", (event) => onSocketClosed(current, event));
  current.timers.push(setTimeout(() => {
    if (state === "starting" && session === current) fail(current, "The connection timed out. Please try again.");
  }, CONNECT_TIMEOUT_MS));

  try {
    await new Promise((resolve, reject) => {
      ws.addEventListener("open", resolve, { once: true });
      ws.addEventListener("error", () => reject(new Error("websocket")), { once: true });
    });
  } catch {
    return fail(current, "Cannot reach the server.");
  }
  if (current.ended) return;

  try {
    const pc = new RTCPeerConnection({ iceServers: config.ice_servers });
    current.pc = pc;
    pc.addTransceiver("video", { direction: "recvonly" });
    if (mode === "mic") {
      for (const track of current.mic.getAudioTracks()) pc.addTrack(track, current.mic);
    } else {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    pc.addEventListener("track", (event) => onTrack(current, event));
    pc.addEventListener("connectionstatechange", () => onConnectionState(current));

    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc); // the server does not take trickled candidates
    if (current.ended) return;
    send(current, { type: "offer", sdp: pc.localDescription.sdp, avatar: selectedAvatar, mode });
  } catch (error) {
    // Also reached when Stop (or a server error) closed the connection while the offer was being made.
    if (!current.ended) fail(current, `The connection could not be set up (${error.message}).`);
  }
}

function micMessage(error) {
  switch (error && error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was denied. Allow the microphone for this site (the icon in the address bar) and press Start again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and press Start again.";
    case "NotReadableError":
      return "The microphone is in use by another application or cannot be opened.";
    default:
      if (!window.isSecureContext) return "The microphone is only available over HTTPS (or on localhost).";
      return `The microphone could not be opened (${error && error.name}).`;
  }
}

function iceGatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(done, ICE_GATHER_TIMEOUT_MS);
    function done() {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    }
    function check() {
      if (pc.iceGatheringState === "complete") done();
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function send(current, message) {
  if (current.ws && current.ws.readyState === WebSocket.OPEN) current.ws.send(JSON.stringify(message));
}

async function onSignal(current, event) {
  if (session !== current) return;
  let message;
  try { message = JSON.parse(event.data); } catch { return; }
  switch (message.type) {
    case "answer":
      try {
        await current.pc.setRemoteDescription({ type: "answer", sdp: message.sdp });
      } catch (error) {
        return fail(current, `The server's answer could not be used (${error.message}).`);
      }
      current.sessionId = message.session;
      setState("live");
      ui.placeholder.hidden = true;
      setStatus(current.mode === "mic" ? "Live: speak, and the avatar speaks with you."
                                       : "Live: the avatar speaks the presenter's audio.");
      startStats(current);
      break;
    case "stats":
      showServerStats(message);
      break;
    case "pong":
      if (typeof message.t === "number") ui.rtt.textContent = `${Math.round(performance.now() - message.t)} ms`;
      break;
    case "error":
      if (state === "live" && message.error === "bad_state") break; // e.g. an interrupt racing the end
      fail(current, describeError(message.error, message.message, message.status));
      break;
    case "closed":
      finish(current, `The session ended: ${message.reason || "closed by the server"}.`, "info");
      break;
  }
}

function onSocketClosed(current, event) {
  if (session !== current || current.ended) return;
  if (event.code === 4401) return fail(current, describeError("unauthorized"));
  if (event.code === 4403) return fail(current, describeError("forbidden_origin"));
  fail(current, state === "live" ? "The connection to the server was lost." : "Cannot reach the server.");
}

function onConnectionState(current) {
  if (session !== current) return;
  const connection = current.pc.connectionState;
  if (connection === "failed") {
    fail(current, "The media connection failed. A firewall may be blocking it; the server may need a TURN server.");
  } else if (connection === "disconnected" && state === "live") {
    setStatus("The connection is unstable, trying to recover…", "warning");
  } else if (connection === "connected" && state === "live") {
    setStatus(current.mode === "mic" ? "Live: speak, and the avatar speaks with you."
                                     : "Live: the avatar speaks the presenter's audio.");
  }
}

function onTrack(current, event) {
  if (session !== current) return;
  const stream = event.streams[0] || current.stream || new MediaStream();
  if (!event.streams[0]) stream.addTrack(event.track);
  current.stream = stream;
  if (ui.video.srcObject !== stream) ui.video.srcObject = stream;
  // Mic mode gets no audio back; presenter mode does, and autoplay with sound may be refused.
  ui.video.muted = current.mode === "mic";
  ui.video.play().catch(() => {
    if (current.mode === "presenter") {
      ui.video.muted = true;
      ui.video.play().catch(() => {});
      ui.unmute.hidden = false;
    }
  });
}

function interrupt() {
  if (state === "live" && session) send(session, { type: "interrupt" });
}

function stop() {
  if (session) finish(session, "Stopped.", "info");
}

function fail(current, text) {
  finish(current, text, "error");
}

// Tear down one session's resources; a later session is left alone.
function finish(current, text, kind) {
  if (current.ended) return;
  current.ended = true;
  current.timers.forEach((timer) => { clearTimeout(timer); clearInterval(timer); });
  if (current.ws) {
    if (current.ws.readyState === WebSocket.OPEN) current.ws.close(1000, "stop");
    else if (current.ws.readyState === WebSocket.CONNECTING) current.ws.addEventListener("open", () => current.ws.close());
  }
  if (current.pc) current.pc.close();
  stopTracks(current.mic);
  if (session === current) {
    session = null;
    ui.video.srcObject = null;
    ui.unmute.hidden = true;
    resetStats();
    setState("idle");
    showPlaceholder();
    setStatus(text, kind);
  }
}

function stopTracks(stream) {
  if (stream) stream.getTracks().forEach((track) => track.stop());
}

// ---- stats ----------------------------------------------------------------------------------------------------

function startStats(current) {
  current.timers.push(setInterval(() => pollStats(current), 1000));
  current.timers.push(setInterval(() => send(current, { type: "ping", t: performance.now() }), 2000));
  send(current, { type: "ping", t: performance.now() });
}

async function pollStats(current) {
  if (!current.pc || current.ended) return;
  const report = await current.pc.getStats();
  let inbound = null;
  let pairRtt = null;
  report.forEach((entry) => {
    if (entry.type === "inbound-rtp" && entry.kind === "video") inbound = entry;
    if (entry.type === "candidate-pair" && entry.nominated && entry.state === "succeeded"
        && typeof entry.currentRoundTripTime === "number") pairRtt = entry.currentRoundTripTime;
  });
  if (inbound) {
    // framesPerSecond is missing in some browsers; the framesDecoded delta works everywhere.
    let fps = inbound.framesPerSecond;
    const now = { frames: inbound.framesDecoded || 0, time: inbound.timestamp };
    if (typeof fps !== "number" && current.lastFrames && now.time > current.lastFrames.time) {
      fps = (now.frames - current.lastFrames.frames) * 1000 / (now.time - current.lastFrames.time);
    }
    current.lastFrames = now;
    if (typeof fps === "number") ui.fps.textContent = fps.toFixed(1);
  }
  // The WebSocket ping measures the signaling path; the ICE pair's round trip is the media path. Prefer the latter.
  if (pairRtt !== null) ui.rtt.textContent = `${Math.round(pairRtt * 1000)} ms`;
}

function showServerStats(stats) {
  const lip = stats.audio_to_lip_ms;
  if (lip && typeof lip.p50 === "number") {
    ui.lip.textContent = `${Math.round(lip.p50)} ms` + (typeof lip.p95 === "number" ? ` (p95 ${Math.round(lip.p95)})` : "");
  } else if (typeof lip === "number") {
    ui.lip.textContent = `${Math.round(lip)} ms`;
  }
  if (ui.fps.textContent === "–" && typeof stats.fps === "number") ui.fps.textContent = stats.fps.toFixed(1);
}

function resetStats() {
  ui.fps.textContent = ui.rtt.textContent = ui.lip.textContent = "–";
}

// ---- start-up -------------------------------------------------------------------------------------------------

async function init() {
  takeTokenFromUrl();
  setState("idle");
  try {
    config = await api("/api/config"); // with the token: ICE servers (TURN credentials) only come with it
  } catch {
    setStatus("Cannot reach the server. Reload the page to try again.", "error");
    return;
  }
  if (config.auth_required && !config.authorized) showTokenBox();
  fitVideoBox();
  await loadAvatars();
}

// The video box takes the shape of the model's frames (square for the bundled models).
function fitVideoBox() {
  if (config.width > 0 && config.height > 0) {
    ui.video.parentElement.style.aspectRatio = `${config.width} / ${config.height}`;
  }
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
ui.interrupt.addEventListener("click", interrupt);
ui.upload.addEventListener("submit", uploadPortrait);
ui.deleteAvatar.addEventListener("click", deleteSelected);
ui.unmute.addEventListener("click", () => {
  ui.video.muted = false;
  ui.video.play().catch(() => {});
  ui.unmute.hidden = true;
});
ui.saveToken.addEventListener("click", async () => {
  localStorage.setItem(TOKEN_KEY, ui.token.value.trim());
  setStatus("Token saved.");
  forgetPortraits();
  config = await api("/api/config").catch(() => config);
  if (config.authorized) ui.tokenBox.hidden = true;
  await loadAvatars();
});
ui.token.addEventListener("keydown", (event) => { if (event.key === "Enter") ui.saveToken.click(); });

// For debugging from the console (and the browser test): the state, the live peer connection and session id.
window.emote = {
  get pc() { return session && session.pc; },
  get session() { return session && session.sessionId; },
  get state() { return state; },
};

init();

// The visible "AI-generated" badge is the viewer's choice; the invisible watermark is in every frame regardless.
(() => {
  const toggle = document.getElementById('show-badge');
  const badge = document.getElementById('badge');
  const saved = localStorage.getItem('emote-badge') === '1';
  toggle.checked = saved;
  badge.hidden = !saved;
  toggle.addEventListener('change', () => {
    badge.hidden = !toggle.checked;
    localStorage.setItem('emote-badge', toggle.checked ? '1' : '0');
  });
})();
