// Sparkle Factory viewer: synced videos, the BAIT mask drawn from its packed bits, live updates (SSE).
// Plain JavaScript, no library, no build step.
"use strict";
(function () {
  const base = document.body.dataset.base || "";
  const sample = document.getElementById("sample");
  if (!sample) return;

  // --- videos in sync: the source leads, the others follow its clock ------------------------------------
  const master = document.getElementById("source");
  const followers = Array.from(document.querySelectorAll('video[data-sync="follow"]'));
  const playButton = document.getElementById("play");
  const frameLabel = document.getElementById("frame");
  const fps = parseFloat((document.getElementById("mask") || {}).dataset?.fps || "16");
  if (master) {
    master.addEventListener("play", () => {
      followers.forEach((v) => v.play().catch(() => {}));
      if (playButton) playButton.textContent = "pause";
    });
    master.addEventListener("pause", () => {
      followers.forEach((v) => v.pause());
      if (playButton) playButton.textContent = "play";
    });
    master.addEventListener("seeked", () => followers.forEach((v) => { v.currentTime = master.currentTime; }));
    setInterval(() => {
      followers.forEach((v) => {
        if (v.readyState >= 1 && Math.abs(v.currentTime - master.currentTime) > 0.08) v.currentTime = master.currentTime;
        if (!master.paused && v.paused) v.play().catch(() => {});
      });
    }, 400);
    if (playButton) playButton.addEventListener("click", () => { if (master.paused) master.play(); else master.pause(); });
  }

  // --- the mask: np.packbits of the flattened (T, H, W) bool array, big-endian bits -----------------------
  const canvas = document.getElementById("mask");
  const toggle = document.getElementById("mask-toggle");
  const overlay = { bits: null, shape: null, drawn: -1 };
  window.sparkleMask = overlay;  // for tests and the console: shape, bits, drawn frame
  function drawMask(frame) {
    if (!overlay.bits || !canvas) return;
    const [T, H, W] = overlay.shape;
    frame = Math.max(0, Math.min(T - 1, frame));
    if (frame === overlay.drawn) return;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(W, H);
    const data = img.data, bits = overlay.bits, start = frame * H * W;
    for (let i = 0; i < H * W; i++) {
      const p = start + i;
      if ((bits[p >> 3] >> (7 - (p & 7))) & 1) {
        const o = 4 * i; data[o] = 255; data[o + 1] = 0; data[o + 2] = 160; data[o + 3] = 110;
      }
    }
    ctx.putImageData(img, 0, 0);
    overlay.drawn = frame;
  }
  function frameOf(t) { return Math.floor(t * fps + 1e-3); }
  if (canvas) {
    fetch(canvas.dataset.src).then((r) => {
      if (!r.ok) throw new Error(r.status);
      overlay.shape = r.headers.get("X-Mask-Shape").split(",").map(Number);
      return r.arrayBuffer();
    }).then((buf) => {
      overlay.bits = new Uint8Array(buf);
      canvas.width = overlay.shape[2]; canvas.height = overlay.shape[1];
      drawMask(master ? frameOf(master.currentTime) : 0);
    }).catch((e) => { canvas.dataset.error = String(e); });
    if (toggle) toggle.addEventListener("change", () => { canvas.style.display = toggle.checked ? "" : "none"; });
  }
  if (master) {
    const tick = (now, meta) => {
      const t = meta && meta.mediaTime !== undefined ? meta.mediaTime : master.currentTime;
      const f = frameOf(t);
      if (frameLabel) frameLabel.textContent = String(f);
      drawMask(f);
      if (master.requestVideoFrameCallback) master.requestVideoFrameCallback(tick);
      else requestAnimationFrame(() => tick());
    };
    if (master.requestVideoFrameCallback) master.requestVideoFrameCallback(tick); else requestAnimationFrame(() => tick());
    master.addEventListener("seeked", () => drawMask(frameOf(master.currentTime)));
  }

  // --- live: the sample's events until it is final ------------------------------------------------------
  if (sample.dataset.live === "true" && window.EventSource) {
    const id = sample.dataset.id;
    const source = new EventSource(`${base}/samples/${id}/events`);
    let artifacts = JSON.stringify(Object.keys(JSON.parse(document.getElementById("detail").textContent).artifacts).sort());
    source.onmessage = (event) => {
      const s = JSON.parse(event.data);
      const state = document.getElementById("state");
      state.textContent = s.state; state.className = `state ${s.state}`;
      document.getElementById("stage").textContent = s.stage || "";
      document.getElementById("reason").textContent = s.reason || "";
      renderStages(s.stages);
      const now = JSON.stringify(Object.keys(s.artifacts).sort());
      const final = ["accepted", "rejected", "failed", "cancelled"].includes(s.state);
      if (final) source.close();
      if (now !== artifacts || final) { artifacts = now; setTimeout(() => location.reload(), final ? 300 : 0); }
    };
  }
  function renderStages(stages) {
    const body = document.querySelector("#stages tbody");
    body.replaceChildren(...stages.map((d) => {
      const tr = document.createElement("tr");
      tr.className = d.accepted ? "ok" : "no";
      const n = Object.keys(d.scores || {}).length;
      const cells = [d.stage, d.name, d.accepted ? "kept" : "refused", d.reason, n ? `${n} values` : "",
                     (d.seconds || 0).toFixed(2)];
      cells.forEach((text, i) => { const td = document.createElement("td"); td.textContent = text;
                                   if (i === 5) td.className = "num"; tr.appendChild(td); });
      return tr;
    }));
    const total = stages.reduce((a, d) => a + (d.seconds || 0), 0);
    document.getElementById("total-s").textContent = total.toFixed(2);
  }
})();
