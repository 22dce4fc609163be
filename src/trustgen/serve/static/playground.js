// The trustgen playground: talks to this server's /v1 API with fetch, nothing else.
// Model output is only ever put on the page as text (textContent / text nodes), never as HTML.
"use strict";

const KEY_STORAGE = "trustgen.apiKey"; // sessionStorage: gone when the tab closes
const MAX_FILE_BYTES = 12 * 1024 * 1024; // base64 of this still fits the server's 16 MiB body limit

const $ = (id) => document.getElementById(id);

// -- talking to the server --------------------------------------------------------------------

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

/** fetch that turns an API error ({"error": {"message": ...}}) into a thrown Error with that message. */
async function call(path, body, signal) {
  const init = body === undefined ? { headers: headers(), signal }
    : { method: "POST", headers: headers(), body: JSON.stringify(body), signal };
  const response = await fetch(path, init);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const payload = await response.json();
      if (payload && payload.error && payload.error.message) message = payload.error.message;
    } catch (_) { /* not JSON: keep the status line */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

/** The JSON payloads of a server-sent event stream (`data: {...}` lines), until `data: [DONE]`. */
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop(); // an incomplete line waits for the next read
      for (const line of lines) {
        if (!line.startsWith("data:")) continue; // blank separators, comments, other fields
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function setStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

function showError(error) {
  setStatus(error.status === 401 ? `${error.message} Enter the key above.` : error.message, true);
}

// -- API key and models -----------------------------------------------------------------------

let models = [];

async function loadModels() {
  try {
    const response = await call("/v1/models");
    models = (await response.json()).data;
  } catch (error) {
    models = [];
    fillModels();
    showError(error);
    return;
  }
  fillModels();
  const names = models.map((m) => m.id).join(", ");
  setStatus(models.length ? `Serving ${names}.` : "This server serves no model.");
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label;
  return element;
}

function fillModels() {
  for (const [id, kind] of [["text-model", "text"], ["image-model", "image"], ["music-model", "music"]]) {
    const select = $(id);
    const previous = select.value;
    const list = models.filter((m) => m.trustgen && m.trustgen.kind === kind);
    select.replaceChildren(...list.map((m) => option(m.id, m.id)));
    if (!list.length) select.append(option("", `no ${kind} model`));
    if (list.some((m) => m.id === previous)) select.value = previous;
  }
  textModelChanged();
  imageModelChanged();
  musicModelsChanged();
}

function modelInfo(id) {
  const found = models.find((m) => m.id === id);
  return found ? found.trustgen : null;
}

// The most tokens the prompt can take: one per character for a char tokenizer, at most one per
// UTF-8 byte for byte and byte-level BPE tokenizers (so the bound never lets a request overflow).
function promptTokensAtMost(info, prompt) {
  return info.tokenizer === "char" ? [...prompt].length : new TextEncoder().encode(prompt).length;
}

function textModelChanged() {
  const info = modelInfo($("text-model").value);
  const slider = $("max-tokens");
  if (info && info.context) {
    // Max tokens is bounded by the context the prompt leaves.
    const room = Math.max(1, info.context - promptTokensAtMost(info, $("prompt").value));
    slider.max = String(room);
    if (Number(slider.value) > room) slider.value = String(room);
  }
  $("generate").disabled = running !== null || !info;
  showSliders();
}

function imageModelChanged() {
  const info = modelInfo($("image-model").value);
  const classes = (info && info.classes) || [];
  const select = $("image-prompt");
  select.replaceChildren(option("", classes.length ? "any class" : "(this model takes no label)"),
    ...classes.map((c) => option(String(c), String(c))));
  select.disabled = !classes.length;
  $("image-generate").disabled = !info;
}

// -- tabs ---------------------------------------------------------------------------------------

function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
}

function tabKeys(event) {
  const tabs = [...document.querySelectorAll('[role="tab"]:not([hidden])')];
  const at = tabs.indexOf(event.target);
  const next = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (next === undefined) return;
  event.preventDefault();
  const tab = tabs[(next + tabs.length) % tabs.length];
  selectTab(tab);
  tab.focus();
}

// -- text: streaming generation -----------------------------------------------------------------

let running = null; // the AbortController of the generation in progress
let generated = ""; // the generated text (without the prompt)
let generation = 0; // bumps with each Generate, so a late watermark answer for old text is ignored

function showSliders() {
  for (const id of ["temperature", "top-p", "top-k", "max-tokens"]) {
    const value = $(id).value;
    $(`${id}-value`).textContent = id === "top-k" && value === "0" ? "off" : value;
  }
}

function completionBody() {
  const body = {
    model: $("text-model").value,
    prompt: $("prompt").value,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    stream: true,
    // Chunks bundle what each 20 ms generated: the counts in every chunk give a true tokens/s.
    stream_options: { include_usage: true, continuous_usage_stats: true },
  };
  const topK = Number($("top-k").value);
  if (topK > 0) body.top_k = topK;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

function showSpeed(tokens, started, firstAt) {
  const seconds = (performance.now() - started) / 1000;
  const rate = seconds > 0 ? tokens / seconds : 0;
  const first = firstAt === null ? "" : ` · first token ${Math.round(firstAt - started)} ms`;
  $("speed").textContent = `${tokens} tokens · ${rate.toFixed(1)} tokens/s${first}`;
}

function setRunning(controller) {
  running = controller;
  $("generate").disabled = controller !== null || !modelInfo($("text-model").value);
  $("stop").disabled = controller === null;
  $("output").setAttribute("aria-busy", String(controller !== null));
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  const controller = new AbortController();
  setRunning(controller);
  const mine = ++generation;
  generated = "";
  $("output").replaceChildren();
  $("verdict").textContent = "";
  $("legend").hidden = true;
  $("speed").textContent = "";
  setStatus("Generating…");
  const started = performance.now();
  let tokens = 0;
  let firstAt = null;
  let reason = null;
  try {
    const response = await call("/v1/completions", completionBody(), controller.signal);
    for await (const chunk of serverEvents(response)) {
      if (chunk.usage) tokens = chunk.usage.completion_tokens; // tokens so far, partial characters included
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.text) {
        if (firstAt === null) firstAt = performance.now();
        generated += choice.text;
        $("output").append(document.createTextNode(choice.text));
      }
      if (choice.finish_reason) reason = choice.finish_reason;
      showSpeed(tokens, started, firstAt);
    }
    showSpeed(tokens, started, firstAt);
    setStatus(`Done (${reason === "length" ? "reached max tokens" : reason === "stop" ? "stop string" : reason}).`);
  } catch (error) {
    if (error.name === "AbortError") setStatus("Stopped: the server cancelled the generation.");
    else showError(error);
  } finally {
    setRunning(null);
  }
  if ($("highlight").checked && mine === generation) await highlight();
}

function stop() {
  if (running) running.abort(); // closes the connection; the server stops decoding at its next step
}

// -- text: watermark highlighting ---------------------------------------------------------------

function plainOutput() {
  $("output").replaceChildren(document.createTextNode(generated));
  $("verdict").textContent = "";
  $("legend").hidden = true;
}

async function highlight() {
  if (!$("highlight").checked) { plainOutput(); return; }
  if (running) return; // done when the generation ends
  if (!generated.trim()) { $("verdict").textContent = "Generate some text first."; return; }
  const mine = generation;
  $("verdict").textContent = "Checking the watermark…";
  let found;
  try {
    found = await (await call("/v1/detect", { text: generated })).json();
  } catch (error) {
    if (mine === generation) $("verdict").textContent = `Cannot check: ${error.message}`;
    return;
  }
  if (mine !== generation || !$("highlight").checked) return;
  const spans = found.tokens.map((token) => {
    const span = document.createElement("span");
    span.className = `tok ${token.green === true ? "green" : token.green === false ? "red" : "unscored"}`;
    span.textContent = token.text;
    if (token.green === true) span.title = "green-list token (carries the watermark)";
    return span;
  });
  $("output").replaceChildren(...spans);
  $("legend").hidden = false;
  const p = Number(found.p_value);
  $("verdict").textContent = `${found.verdict} · scheme ${found.scheme}, key ${found.key_id} · `
    + `p-value ${p < 0.001 ? p.toExponential(1) : p.toFixed(3)} · ${found.scored} tokens scored`;
}

// -- images -------------------------------------------------------------------------------------

async function generateImages(event) {
  event.preventDefault();
  const button = $("image-generate");
  const model = $("image-model").value;
  const body = { model, prompt: $("image-prompt").value, n: Number($("image-n").value) };
  if ($("image-seed").value !== "") body.seed = Number($("image-seed").value);
  button.disabled = true;
  $("grid").setAttribute("aria-busy", "true");
  setStatus("Generating images…");
  try {
    const result = await (await call("/v1/images/generations", body)).json();
    const label = body.prompt ? `class ${body.prompt}` : "any class";
    const figures = result.data.map((item, i) => {
      const source = `data:image/png;base64,${item.b64_json}`;
      const figure = document.createElement("figure");
      const image = document.createElement("img");
      image.src = source;
      image.alt = `Generated image ${i + 1} of ${result.data.length} (${label})`;
      const save = document.createElement("a");
      save.href = source;
      save.download = `${model}-${i + 1}.png`;
      save.textContent = "Save";
      figure.append(image, save);
      return figure;
    });
    $("grid").replaceChildren(...figures);
    const mark = result.trustgen && result.trustgen.watermark;
    $("image-info").textContent = `${figures.length} signed image(s) from ${model}`
      + (mark ? ` · watermark ${mark.scheme}, key ${mark.key_id}` : "");
    setStatus("Images ready.");
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
    $("grid").setAttribute("aria-busy", "false");
  }
}

// -- music --------------------------------------------------------------------------------------

// The Music tab is there only while the server serves a music model.
function musicModelsChanged() {
  const served = models.some((m) => m.trustgen && m.trustgen.kind === "music");
  const tab = $("tab-music");
  if (!served && tab.getAttribute("aria-selected") === "true") selectTab($("tab-text"));
  tab.hidden = !served;
  $("music-generate").disabled = !served;
}

// Bars apply to a free piece only: with a melody the field is off (and so the form does not check it).
function melodyChanged() {
  $("music-bars").disabled = $("music-melody").value.trim() !== "";
}

function markLine(name, mark, note) {
  if (mark) return `${name} watermarked ${mark.scheme}, key ${mark.key_id}`;
  return note ? `${name}: ${note}` : null;
}

function pieceFigure(item, model, count) {
  const figure = document.createElement("figure");
  const player = document.createElement("audio");
  player.controls = true;
  player.src = `data:audio/wav;base64,${item.wav_b64}`;
  player.setAttribute("aria-label", `Piece ${item.index + 1} of ${count}`);
  const roll = document.createElement("img");
  roll.src = `data:image/png;base64,${item.piano_roll_png_b64}`;
  roll.alt = `Piano roll of piece ${item.index + 1}: ${item.bars} bar(s), soprano red, alto blue, tenor green, bass violet`;
  const links = document.createElement("p");
  const manifest = `data:application/json;charset=utf-8,${encodeURIComponent(item.midi_manifest)}`;
  for (const [source, suffix] of [[player.src, "wav"], [`data:audio/midi;base64,${item.midi_b64}`, "mid"],
    [manifest, "mid.manifest.json"]]) {
    const save = document.createElement("a");
    save.href = source;
    save.download = `${model}-${item.index + 1}.${suffix}`;
    save.textContent = `Save .${suffix}`;
    links.append(save, " ");
  }
  const marks = document.createElement("figcaption");
  marks.className = "muted";
  marks.textContent = [markLine("notes", item.trustgen.watermark),
    markLine("audio", item.trustgen.audio_watermark, item.trustgen.audio_watermark_note)]
    .filter(Boolean).join(" · ");
  figure.append(player, roll, links, marks);
  return figure;
}

async function generateMusic(event) {
  event.preventDefault();
  const button = $("music-generate");
  const model = $("music-model").value;
  const body = { model, n: Number($("music-n").value) };
  const melody = $("music-melody").value.trim();
  if (melody) body.prompt = melody; // a harmonization lasts as long as its melody
  else body.bars = Number($("music-bars").value);
  if ($("music-seed").value !== "") body.seed = Number($("music-seed").value);
  button.disabled = true;
  $("pieces").setAttribute("aria-busy", "true");
  setStatus(melody ? "Harmonizing the melody…" : "Composing…");
  try {
    const result = await (await call("/v1/audio/generations", body)).json();
    $("pieces").replaceChildren(...result.data.map((item) => pieceFigure(item, model, result.data.length)));
    $("music-info").textContent = `${result.data.length} signed piece(s) from ${model}`
      + " (the WAV carries its C2PA manifest inside; the MIDI file's is its .manifest.json)";
    setStatus("Music ready.");
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
    $("pieces").setAttribute("aria-busy", "false");
  }
}

// -- verify -------------------------------------------------------------------------------------

async function base64Of(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function field(list, name, value) {
  if (value === null || value === undefined || value === "") return;
  const term = document.createElement("dt");
  term.textContent = name;
  const detail = document.createElement("dd");
  detail.textContent = String(value);
  list.append(term, detail);
}

function watermarkLine(mark) {
  if (!mark) return null;
  if (!mark.checked) return `not checked (${mark.reason})`;
  const p = Number(mark.p_value);
  return `${mark.verdict} · ${mark.scheme}, key ${mark.key_id} · p-value ${p < 0.001 ? p.toExponential(1) : p.toFixed(3)}`;
}

async function verifyFiles(fileList) {
  const files = [...fileList];
  if (!files.length) return;
  const isSidecar = (f) => f.name.endsWith(".manifest.json");
  const file = files.find((f) => !isSidecar(f)) || files[0];
  const sidecar = files.find((f) => f !== file && isSidecar(f));
  const summary = $("verify-summary");
  const fields = $("verify-fields");
  fields.replaceChildren();
  summary.classList.remove("error");
  if (file.size > MAX_FILE_BYTES || (sidecar && sidecar.size > 1024 * 1024)) {
    summary.textContent = `${file.name} is too large to send (the limit is ${MAX_FILE_BYTES >> 20} MB).`;
    summary.classList.add("error");
    return;
  }
  summary.textContent = `Verifying ${file.name}…`;
  try {
    const body = { filename: file.name, content: await base64Of(file) };
    if (sidecar) body.manifest = await sidecar.text();
    const report = await (await call("/v1/verify", body)).json();
    summary.textContent = report.summary;
    summary.classList.toggle("error", report.status !== "verified");  // only a verified file passes
    const claim = report.claim || {};
    field(fields, "File", report.file);
    field(fields, "Manifest", report.status + (sidecar ? ` (sidecar ${sidecar.name})` : ""));
    field(fields, "Signer", report.signer);
    field(fields, "Content", report.content);
    field(fields, "Reason", report.reason);
    field(fields, "Model id", claim.model_id);
    field(fields, "Family", claim.family);
    field(fields, "Seed", claim.seed);
    field(fields, "Watermark", watermarkLine(report.watermark));
  } catch (error) {
    summary.textContent = error.message;
    summary.classList.add("error");
  }
}

// -- wiring -------------------------------------------------------------------------------------

function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadModels();
  });
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", tabKeys);
  }
  for (const id of ["temperature", "top-p", "top-k", "max-tokens"]) $(id).addEventListener("input", showSliders);
  $("text-model").addEventListener("change", textModelChanged);
  $("prompt").addEventListener("input", textModelChanged);
  $("image-model").addEventListener("change", imageModelChanged);
  $("text-form").addEventListener("submit", generate);
  $("stop").addEventListener("click", stop);
  $("highlight").addEventListener("change", highlight);
  $("image-form").addEventListener("submit", generateImages);
  $("music-melody").addEventListener("input", melodyChanged);
  $("music-form").addEventListener("submit", generateMusic);

  const drop = $("drop");
  $("verify-files").addEventListener("change", (event) => verifyFiles(event.target.files));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    verifyFiles(event.dataTransfer.files);
  });

  showSliders();
  melodyChanged(); // a melody the browser restored on reload
  loadModels();
}

start();
