// The chat page: OpenAI-style messages kept here, answers streamed from /v1/chat/completions
// (server-sent events read from fetch, since EventSource cannot POST), grounding boxes drawn
// over the last image, an animated GIF sent as a video. Plain script, no build step;
// window.qwen2vl exposes helpers for tests.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    model: null, about: null, messages: [], attachments: [], controller: null, lastImage: null,
  };

  // Grounding markers as the model writes them, to show the answer's text; the boxes themselves
  // come parsed and in image pixels from the server's "grounding" field.
  const ITEM = /<\|object_ref_start\|>([\s\S]*?)<\|object_ref_end\|>|<\|box_start\|>([\s\S]*?)<\|box_end\|>|<\|quad_start\|>([\s\S]*?)<\|quad_end\|>/g;

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

  // Largest display sizes: in the transcript, and full size (the viewport) after a click.
  const INLINE = [320, 320];
  const fullSize = () => [Math.round(innerWidth * 0.94), Math.round(innerHeight * 0.9)];

  // An image scaled to fit maxSize (the synthetic scenes, ~100 px, scale up), with the boxes
  // of `grounding` (the server's field: objects in pixels of a width x height image) drawn on
  // a canvas laid over it; resolves to the figure. An inline figure opens full size on click.
  function showImage(container, src, grounding = null, maxSize = INLINE) {
    const objects = grounding?.objects ?? [];
    const figure = document.createElement("div");
    figure.className = "figure";
    const img = new Image();
    figure.append(img);
    container.append(figure);
    return new Promise((resolve) => {
      img.onload = () => {
        const [nw, nh] = [img.naturalWidth, img.naturalHeight];
        const scale = Math.min(maxSize[0] / nw, maxSize[1] / nh);
        const [w, h] = [Math.max(1, Math.round(nw * scale)), Math.max(1, Math.round(nh * scale))];
        Object.assign(img.style, { width: `${w}px`, height: `${h}px` });
        if (scale >= 2) img.style.imageRendering = "pixelated"; // crisp shapes, not blur
        if (objects.length) figure.append(boxCanvas(w, h, grounding));
        figure.dataset.boxes = String(objects.reduce((n, o) => n + o.boxes.length + o.quads.length, 0));
        if (maxSize === INLINE) {
          figure.classList.add("zoomable");
          figure.title = "Click for full size";
          figure.onclick = () => openLightbox(src, grounding);
        }
        resolve(figure);
      };
      img.src = src;
    });
  }

  // The boxes drawn at the displayed size (times the screen's pixel ratio), so lines and
  // labels stay thin and sharp however much the image was scaled.
  function boxCanvas(w, h, { width, height, objects }) {
    const [sx, sy] = [w / width, h / height];
    const canvas = document.createElement("canvas");
    const ratio = window.devicePixelRatio || 1;
    [canvas.width, canvas.height] = [Math.round(w * ratio), Math.round(h * ratio)];
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.lineWidth = 2;
    ctx.font = "bold 13px sans-serif";
    const colours = new Map();
    for (const obj of objects) {
      if (!colours.has(obj.label)) colours.set(obj.label, PALETTE[colours.size % PALETTE.length]);
      ctx.strokeStyle = ctx.fillStyle = colours.get(obj.label);
      for (const [x1, y1, x2, y2] of obj.boxes) {
        const [a, b] = [x1 * sx, y1 * sy];
        ctx.strokeRect(a, b, (x2 - x1) * sx, (y2 - y1) * sy);
        if (obj.label) ctx.fillText(obj.label, a + 3, b > 16 ? b - 4 : b + 15);
      }
      for (const quad of obj.quads) {
        ctx.beginPath();
        quad.forEach(([x, y], i) => ctx[i ? "lineTo" : "moveTo"](x * sx, y * sy));
        ctx.closePath();
        ctx.stroke();
      }
    }
    return canvas;
  }

  function openLightbox(src, grounding) {
    const box = $("lightbox");
    box.textContent = "";
    box.hidden = false;
    return showImage(box, src, grounding, fullSize());
  }

  // How many frames a GIF holds, by walking its blocks; 0 for bytes that are not a GIF.
  // An animated GIF (the demo's videos are GIFs) goes to the model as a video, not an image.
  function gifFrames(b) {
    const magic = String.fromCharCode(...b.subarray(0, 6));
    if (magic !== "GIF87a" && magic !== "GIF89a") return 0;
    const table = (flags) => (flags & 0x80 ? 3 * 2 ** ((flags & 7) + 1) : 0); // colour table
    let pos = 13 + table(b[10]);
    const skipSubBlocks = () => {
      while (pos < b.length && b[pos]) pos += b[pos] + 1;
      pos += 1;
    };
    let frames = 0;
    while (pos < b.length) {
      if (b[pos] === 0x2c) { // image descriptor, local colour table, LZW code size, data
        frames += 1;
        pos += 10 + table(b[pos + 9]) + 1;
        skipSubBlocks();
      } else if (b[pos] === 0x21) { // extension: introducer, label, data
        pos += 2;
        skipSubBlocks();
      } else {
        break; // the trailer (0x3b), or a damaged file: the frames read so far
      }
    }
    return frames;
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
      state.about = body.data[0].qwen2vl ?? null;
      $("model").textContent = state.model;
      showNotice();
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
    $("notice")?.remove();
    bubble("user", text, state.attachments);
    state.messages.push({ role: "user", content });
    setAttachments([]);
    const out = bubble("assistant", "");
    out.dataset.state = "streaming";
    let answer = "";
    let grounding = null;
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
          skip_special_tokens: false, // keep the markers: referred objects are highlighted
        }),
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.error?.message ?? `${response.status} ${response.statusText}`);
      }
      for await (const chunk of events(response)) {
        if (chunk.error) throw new Error(chunk.error.message);
        grounding = chunk.choices[0]?.delta?.grounding ?? grounding;
        const delta = chunk.choices[0]?.delta?.content;
        if (delta) {
          answer += delta;
          renderAnswer(out.text, answer);
          $("log").scrollTop = $("log").scrollHeight;
        }
      }
      state.messages.push({ role: "assistant", content: answer });
      if (grounding && state.lastImage) {
        await showImage(out, state.lastImage, grounding);
        $("log").scrollTop = $("log").scrollHeight;
      }
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
        if (!a.url.startsWith("data:video/")) {
          showImage(media, a.url); // an image, or an animated GIF sent as a video
          continue;
        }
        const video = document.createElement("video");
        Object.assign(video, { src: a.url, controls: true });
        media.append(video);
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
      if (a.url.startsWith("data:image/")) {
        const img = document.createElement("img");
        img.src = a.url;
        chip.append(img);
      }
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.title = `remove ${a.name}`;
      remove.onclick = () => setAttachments(state.attachments.filter((_, j) => j !== i));
      chip.append(a.kind === "video" ? `${a.name} (video)` : a.name, remove);
      box.append(chip);
    });
  }

  async function readFile(file) {
    const url = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    const animated = file.type === "image/gif" && gifFrames(new Uint8Array(await file.arrayBuffer())) > 1;
    return { kind: file.type.startsWith("video/") || animated ? "video" : "image", url, name: file.name };
  }

  // The empty chat's note on the embedded default model: what it knows, two questions it
  // answers, and how to serve a real checkpoint. The text comes from the model card.
  function showNotice() {
    $("notice")?.remove();
    const about = state.about;
    if (!about?.default_model || $("log").querySelector(".msg")) return;
    const notice = element("section", "", withCode(about.note));
    notice.id = "notice";
    const list = element("ul", "");
    for (const { attach, ask: question } of about.examples) {
      const example = element("button", "example", question);
      example.type = "button";
      example.title = "Put this question in the box";
      example.onclick = () => {
        $("prompt").value = question;
        $("prompt").focus();
      };
      list.append(element("li", "", "Attach ", element("code", "", attach), " and ask ", example));
    }
    notice.append(
      element("p", "", "Try it: run ", element("code", "", "qwen2vl demo"), ", then"), list,
      element("p", "", "For a real model: ", element("code", "", about.real_model)),
    );
    $("log").append(notice);
  }

  function element(tag, className, ...children) {
    const el = document.createElement(tag);
    el.className = className;
    el.append(...children);
    return el;
  }

  // A paragraph of text with `backticked` spans as code.
  function withCode(text) {
    return element("p", "", ...text.split("`").map((part, i) => (i % 2 ? element("code", "", part) : part)));
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
    showNotice();
  });
  $("lightbox").addEventListener("click", () => ($("lightbox").hidden = true));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") $("lightbox").hidden = true;
  });
  $("api-key").value = localStorage.getItem("qwen2vl-api-key") ?? "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("qwen2vl-api-key", $("api-key").value);
    loadModel();
  });

  window.qwen2vl = { showImage, renderAnswer, gifFrames, state };
  loadModel();
})();
