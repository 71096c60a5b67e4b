// The chat page: OpenAI-style messages kept here, answers streamed from /v1/chat/completions
// (server-sent events read from fetch, since EventSource cannot POST), grounding boxes drawn
// over the last image. Plain script, no build step; window.qwen2vl exposes helpers for tests.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { model: null, messages: [], attachments: [], controller: null, lastImage: null };

  // Grounding markers as the model writes them (coordinates in [0, 1000) of the image).
  const ITEM = /<\|object_ref_start\|>([\s\S]*?)<\|object_ref_end\|>|<\|box_start\|>([\s\S]*?)<\|box_end\|>|<\|quad_start\|>([\s\S]*?)<\|quad_end\|>/g;
  const POINT = /\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)/g;

  // Mirrors qwen2vl.grounding.parse_grounding: boxes attach to the reference right before them.
  function parseGrounding(text) {
    const objects = [];
    let current = null;
    let pos = 0;
    for (const m of text.matchAll(ITEM)) {
      const between = text.slice(pos, m.index).replace(/[\s,;]/g, "");
      const adjacent = current !== null && between === "";
      pos = m.index + m[0].length;
      if (m[1] !== undefined) {
        current = { label: m[1].trim(), boxes: [], quads: [] };
        objects.push(current);
        continue;
      }
      const pts = [...(m[2] ?? m[3]).matchAll(POINT)].map((p) => [Number(p[1]), Number(p[2])]);
      const boxes = [];
      const quads = [];
      if (m[2] !== undefined && pts.length && pts.length % 2 === 0) {
        for (let i = 0; i < pts.length; i += 2) boxes.push([...pts[i], ...pts[i + 1]]);
      } else if (m[3] !== undefined && pts.length === 4) {
        quads.push(pts);
      }
      if (!boxes.length && !quads.length) continue;
      if (!adjacent) {
        current = { label: null, boxes: [], quads: [] };
        objects.push(current);
      }
      current.boxes.push(...boxes);
      current.quads.push(...quads);
    }
    return objects;
  }

  // The answer as shown: markers removed, a referred object highlighted.
  function renderAnswer(el, text) {
    el.textContent = "";
    let pos = 0;
    for (const m of text.matchAll(ITEM)) {
      el.append(text.slice(pos, m.index));
      const span = document.createElement("span");
      span.className = "tag";
      span.textContent = m[1] !== undefined ? m[1] : (m[2] ?? m[3]).trim();
      el.append(span);
      pos = m.index + m[0].length;
    }
    el.append(text.slice(pos).replace(/<\|[a-z_]+\|>/g, ""));
  }

  const PALETTE = ["#e6194b", "#3cb44b", "#0082c8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"];

  // An image with the objects' boxes drawn on a canvas laid over it; resolves to the figure.
  function drawBoxes(container, src, objects) {
    const figure = document.createElement("div");
    figure.className = "figure";
    const img = new Image();
    const canvas = document.createElement("canvas");
    figure.append(img, canvas);
    container.append(figure);
    return new Promise((resolve) => {
      img.onload = () => {
        const w = (canvas.width = img.naturalWidth);
        const h = (canvas.height = img.naturalHeight);
        const ctx = canvas.getContext("2d");
        ctx.lineWidth = Math.max(2, Math.round(w / 200));
        ctx.font = `${Math.max(12, Math.round(w / 40))}px sans-serif`;
        const colours = new Map();
        for (const obj of objects) {
          if (!colours.has(obj.label)) colours.set(obj.label, PALETTE[colours.size % PALETTE.length]);
          ctx.strokeStyle = ctx.fillStyle = colours.get(obj.label);
          for (const [x1, y1, x2, y2] of obj.boxes) {
            const [a, b] = [(x1 / 1000) * w, (y1 / 1000) * h];
            ctx.strokeRect(a, b, ((x2 - x1) / 1000) * w, ((y2 - y1) / 1000) * h);
            if (obj.label) ctx.fillText(obj.label, a + 3, Math.max(12, b - 4));
          }
          for (const quad of obj.quads) {
            ctx.beginPath();
            quad.forEach(([x, y], i) => ctx[i ? "lineTo" : "moveTo"]((x / 1000) * w, (y / 1000) * h));
            ctx.closePath();
            ctx.stroke();
          }
        }
        figure.dataset.boxes = String(objects.reduce((n, o) => n + o.boxes.length + o.quads.length, 0));
        resolve(figure);
      };
      img.src = src;
    });
  }

  // ---- talking to the server -------------------------------------------------------------

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  async function loadModel() {
    try {
      const r = await fetch("/v1/models", { headers: headers() });
      const body = await r.json();
      if (!r.ok) throw new Error(body.error?.message ?? r.statusText);
      state.model = body.data[0].id;
      $("model").textContent = state.model;
    } catch (e) {
      $("model").textContent = `model list failed: ${e.message} (set the API key in Settings?)`;
    }
  }

  // Yields the JSON of each "data:" event until [DONE].
  async function* events(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function ask(text) {
    const content = state.attachments.map((a) =>
      a.kind === "image"
        ? { type: "image_url", image_url: { url: a.url } }
        : { type: "video_url", video_url: { url: a.url } });
    if (text) content.push({ type: "text", text });
    const image = state.attachments.filter((a) => a.kind === "image").pop();
    if (image) state.lastImage = image.url;
    bubble("user", text, state.attachments);
    state.messages.push({ role: "user", content });
    setAttachments([]);
    const out = bubble("assistant", "");
    out.dataset.state = "streaming";
    let answer = "";
    state.controller = new AbortController();
    setBusy(true);
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        signal: state.controller.signal,
        body: JSON.stringify({
          model: state.model,
          messages: state.messages,
          stream: true,
          max_tokens: Number($("max-tokens").value) || 256,
          temperature: Number($("temperature").value) || 0,
          skip_special_tokens: false, // keep the grounding markers
        }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.error?.message ?? `${response.status} ${response.statusText}`);
      }
      for await (const chunk of events(response)) {
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices[0]?.delta?.content;
        if (delta) {
          answer += delta;
          renderAnswer(out.text, answer);
          $("log").scrollTop = $("log").scrollHeight;
        }
      }
      state.messages.push({ role: "assistant", content: answer });
      const objects = parseGrounding(answer);
      if (objects.length && state.lastImage) await drawBoxes(out, state.lastImage, objects);
      out.dataset.state = "done";
    } catch (e) {
      state.messages.pop(); // keep the history to turns that got an answer
      out.classList.add("error");
      out.text.textContent = answer + (e.name === "AbortError" ? " [stopped]" : `\nError: ${e.message}`);
      out.dataset.state = "error";
    } finally {
      state.controller = null;
      setBusy(false);
    }
  }

  // ---- the page --------------------------------------------------------------------------

  function bubble(role, text, attachments = []) {
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    if (attachments.length) {
      const media = document.createElement("div");
      media.className = "media";
      for (const a of attachments) {
        const m = document.createElement(a.kind === "image" ? "img" : "video");
        m.src = a.url;
        if (a.kind === "video") m.controls = true;
        media.append(m);
      }
      el.append(media);
    }
    el.text = document.createElement("div");
    el.text.className = "text";
    el.text.textContent = text;
    el.append(el.text);
    $("log").append(el);
    return el;
  }

  function setAttachments(list) {
    state.attachments = list;
    const box = $("attachments");
    box.textContent = "";
    list.forEach((a, i) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      if (a.kind === "image") {
        const img = document.createElement("img");
        img.src = a.url;
        chip.append(img);
      }
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.title = `remove ${a.name}`;
      remove.onclick = () => setAttachments(state.attachments.filter((_, j) => j !== i));
      chip.append(a.name, remove);
      box.append(chip);
    });
  }

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve({
        kind: file.type.startsWith("video/") ? "video" : "image", url: reader.result, name: file.name,
      });
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").hidden = !busy;
  }

  $("file").addEventListener("change", async (e) => {
    const added = await Promise.all([...e.target.files].map(readFile));
    setAttachments([...state.attachments, ...added]);
    e.target.value = "";
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text && !state.attachments.length) return;
    $("prompt").value = "";
    ask(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("reset").addEventListener("click", () => {
    state.messages = [];
    state.lastImage = null;
    $("log").textContent = "";
  });
  $("api-key").value = localStorage.getItem("qwen2vl-api-key") ?? "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("qwen2vl-api-key", $("api-key").value);
    loadModel();
  });

  window.qwen2vl = { parseGrounding, drawBoxes, renderAnswer, state };
  loadModel();
})();
