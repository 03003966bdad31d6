// Drover web UI: uploads an artifact from the artifacts page.
//
// The chosen file goes as the raw body of POST /api/v1/artifacts — the endpoint the CLI uses —
// with the session's CSRF token, so the server authorizes, verifies and audits it the same
// way. The browser streams the file from disk and the server streams it into the store:
// neither side holds the whole file in memory.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload-artifact");
  if (!form) return;
  const input = form.querySelector("input[type=file]");
  const button = form.querySelector("button[type=submit]");
  const bar = document.getElementById("upload-progress");
  const status = document.getElementById("upload-status");
  button.disabled = false;

  const fail = (message) => {
    status.textContent = message;
    status.className = "error";
    status.setAttribute("role", "alert");
    bar.hidden = true;
    button.disabled = false;
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = input.files[0];
    if (!file) {
      fail("Choose an artifact file first.");
      return;
    }
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/v1/artifacts");
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("X-CSRF-Token", form.dataset.csrf);
    xhr.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      bar.max = e.total;
      bar.value = e.loaded;
      status.textContent = `Uploading ${file.name}: ${Math.floor((e.loaded * 100) / e.total)}%…`;
    });
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch (_) {
        // Not JSON: said below with the status.
      }
      if ((xhr.status === 200 || xhr.status === 201) && body && body.id) {
        const notice = xhr.status === 201
          ? `Artifact ${body.name} ${body.version} uploaded.`
          : `This file was uploaded before, as ${body.name} ${body.version}.`;
        window.location.href = `/artifacts/${encodeURIComponent(body.id)}?notice=${encodeURIComponent(notice)}`;
      } else if (xhr.status === 401) {
        window.location.href = "/login?next=%2Fartifacts";
      } else if (body && body.error) {
        fail(body.error.message);
      } else {
        fail(`The upload failed (HTTP ${xhr.status}).`);
      }
    });
    xhr.addEventListener("error", () => fail("The upload was interrupted: the server could not be reached."));
    button.disabled = true;
    bar.hidden = false;
    bar.value = 0;
    status.className = "muted";
    status.removeAttribute("role");
    status.textContent = `Uploading ${file.name}…`;
    xhr.send(file);
  });
});
