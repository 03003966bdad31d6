// Drover web UI: remote access in the browser.
//
// - The terminal page: xterm.js on the WebSocket /api/v1/devices/{id}/terminal — the one the
//   CLI uses (binary frames are terminal bytes; text frames are JSON: resize from here,
//   opened / exit / error from the server). The session cookie authenticates it; the server
//   checks that the page is its own (Origin).
// - The files panel: uploads and downloads over /api/v1/devices/{id}/files, checked with
//   SHA-256 here too.
// - The replay page: plays an asciicast v2 recording in xterm.js.
"use strict";

const wsUrl = (path) => `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${path}`;

function startTerminal(el) {
  const status = document.getElementById("terminal-status");
  const term = new Terminal({ cursorBlink: true, convertEol: false, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  const device = encodeURIComponent(el.dataset.device);
  const ws = new WebSocket(wsUrl(`/api/v1/devices/${device}/terminal?cols=${term.cols}&rows=${term.rows}`));
  ws.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  let open = false;
  const say = (text, cls) => {
    status.textContent = text;
    status.className = cls || "muted";
  };
  ws.addEventListener("message", (event) => {
    if (typeof event.data !== "string") {
      term.write(new Uint8Array(event.data));
      return;
    }
    const m = JSON.parse(event.data);
    if (m.type === "opened") {
      open = true;
      say("Connected.");
      el.dataset.state = "open";
      term.focus();
    } else if (m.type === "exit") {
      open = false;
      say(`The shell exited with status ${m.code}.`);
      el.dataset.state = "exited";
    } else if (m.type === "error") {
      open = false;
      say(`${m.message} (${m.code})`, "error");
      el.dataset.state = "error";
    }
  });
  ws.addEventListener("close", () => {
    if (open) say("The connection closed.", "error");
    open = false;
  });
  term.onData((data) => {
    if (open) ws.send(encoder.encode(data));
  });
  term.onResize(({ cols, rows }) => {
    if (open) ws.send(JSON.stringify({ type: "resize", cols, rows }));
  });
  window.addEventListener("resize", () => fit.fit());
  // For tests and people alike: what the terminal shows, as text.
  window.droverTerminalText = () => {
    const b = term.buffer.active;
    const lines = [];
    for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
    return lines.join("\n");
  };
}

async function sha256(blob) {
  const d = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(d), (b) => b.toString(16).padStart(2, "0")).join("");
}

function transfer(form, kind) {
  const status = document.getElementById(`${kind}-status`);
  const bar = document.getElementById(`${kind}-bar`);
  const say = (text, cls) => {
    status.textContent = text;
    status.className = cls || "";
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const device = encodeURIComponent(form.dataset.device);
    const path = form.elements.path.value;
    let url = `/api/v1/devices/${device}/files?op=${kind}&path=${encodeURIComponent(path)}`;
    let file = null;
    let digest = "";
    if (kind === "upload") {
      file = form.elements.file.files[0];
      if (!file) return say("Choose a file first.", "error");
      say("Hashing…");
      digest = await sha256(file);
      url += `&size=${file.size}&sha256=${digest}`;
    }
    const ws = new WebSocket(wsUrl(url));
    ws.binaryType = "arraybuffer";
    const chunks = [];
    let got = 0;
    let size = file ? file.size : 0;
    bar.hidden = false;
    bar.value = 0;
    say("Connecting…");
    const send = async () => {
      const step = 32 * 1024;
      for (let off = 0; off < file.size; off += step) {
        while (ws.bufferedAmount > 1024 * 1024) await new Promise((r) => setTimeout(r, 10));
        ws.send(await file.slice(off, off + step).arrayBuffer());
        bar.max = file.size;
        bar.value = off;
      }
      ws.send(JSON.stringify({ type: "eof" }));
      say("Waiting for the device to check the file…");
    };
    ws.addEventListener("message", async (event) => {
      if (typeof event.data !== "string") {
        chunks.push(event.data);
        got += event.data.byteLength;
        bar.max = size || got;
        bar.value = got;
        return;
      }
      const m = JSON.parse(event.data);
      if (m.type === "opened") {
        say(kind === "upload" ? "Sending…" : "Receiving…");
        if (kind === "upload") send();
      } else if (m.type === "meta") {
        size = m.size;
      } else if (m.type === "done") {
        if (kind === "upload") {
          say(m.sha256 === digest ? `Uploaded ${m.size} bytes to ${path}, SHA-256 verified.` : "The device reports another SHA-256.", m.sha256 === digest ? "" : "error");
        } else {
          const blob = new Blob(chunks);
          if ((await sha256(blob)) !== m.sha256) return say("The received bytes do not match the device's SHA-256.", "error");
          const a = document.createElement("a");
          a.href = URL.createObjectURL(blob);
          a.download = path.split("/").pop();
          a.id = "download-link";
          a.textContent = `Save ${a.download} (${m.size} bytes, SHA-256 verified)`;
          status.replaceChildren(a);
          a.click();
        }
        bar.hidden = true;
      } else if (m.type === "error") {
        say(`${m.message} (${m.code})`, "error");
        bar.hidden = true;
      }
    });
  });
}

async function replay(el) {
  const status = document.getElementById("replay-status");
  const resp = await fetch(`/api/v1/remote-sessions/${encodeURIComponent(el.dataset.session)}/recording`);
  if (!resp.ok) {
    status.textContent = "No recording of this session.";
    return;
  }
  const lines = (await resp.text()).split("\n").filter((l) => l.length);
  const header = JSON.parse(lines[0]);
  const events = lines.slice(1).map((l) => JSON.parse(l));
  const term = new Terminal({ cols: header.width, rows: header.height, disableStdin: true });
  term.open(el);
  document.getElementById("replay-start").addEventListener("click", async () => {
    term.reset();
    let last = 0;
    for (const [t, kind, data] of events) {
      // Long pauses are shortened to a second.
      await new Promise((r) => setTimeout(r, Math.min(1000, (t - last) * 1000)));
      last = t;
      if (kind === "o") term.write(data);
      else if (kind === "r") {
        const [c, r] = data.split("x").map(Number);
        if (c && r) term.resize(c, r);
      }
    }
    status.textContent = "End of the recording.";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const term = document.getElementById("terminal");
  if (term) startTerminal(term);
  const up = document.getElementById("remote-upload");
  if (up) transfer(up, "upload");
  const down = document.getElementById("remote-download");
  if (down) transfer(down, "download");
  const player = document.getElementById("player");
  if (player) replay(player);
});
