// scratchlm chat page: conversations kept in localStorage, answers streamed from the server's
// OpenAI-compatible /v1/chat/completions (server-sent events), parameters from the sidebar.
// Plain browser JavaScript, no build step and no dependencies.
"use strict";

const STORE_KEY = "scratchlm.conversations";
const SETTINGS_KEY = "scratchlm.settings";
const PARAMS = ["temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed", "system"];

const $ = (id) => document.getElementById(id);
let modelId = null;
let conversations = loadJSON(STORE_KEY, []);
let current = null; // the conversation being shown: {id, title, messages: [{role, content}]}
let controller = null; // AbortController of the answer being streamed

function loadJSON(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify(conversations));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// -- settings ------------------------------------------------------------------------------------

function loadSettings() {
  const saved = loadJSON(SETTINGS_KEY, {});
  for (const name of PARAMS) if (saved[name] !== undefined) $(name).value = saved[name];
  $("api-key").value = sessionStorage.getItem("scratchlm.apiKey") || "";
  showSliderValues();
}

function saveSettings() {
  const values = {};
  for (const name of PARAMS) values[name] = $(name).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
  sessionStorage.setItem("scratchlm.apiKey", $("api-key").value);
  showSliderValues();
}

function showSliderValues() {
  $("temperature-value").textContent = $("temperature").value;
  $("top_p-value").textContent = $("top_p").value;
}

function requestParams() {
  const p = {
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10) || 256,
  };
  const topK = parseInt($("top_k").value, 10);
  if (topK > 0) p.top_k = topK;
  const rep = parseFloat($("repetition_penalty").value);
  if (rep && rep !== 1) p.repetition_penalty = rep;
  const seed = parseInt($("seed").value, 10);
  if (!Number.isNaN(seed)) p.seed = seed;
  return p;
}

// -- conversations -------------------------------------------------------------------------------

function newConversation() {
  current = { id: Date.now().toString(36), title: "New chat", messages: [] };
  conversations.unshift(current);
  save();
  render();
}

function selectConversation(id) {
  if (controller) return; // finish (or stop) the current answer first
  current = conversations.find((c) => c.id === id) || current;
  render();
}

function renderHistory() {
  const list = $("history");
  list.innerHTML = "";
  for (const c of conversations) {
    const li = document.createElement("li");
    li.textContent = c.title;
    li.title = c.title;
    li.dataset.id = c.id;
    if (current && c.id === current.id) li.classList.add("active");
    li.addEventListener("click", () => selectConversation(c.id));
    list.appendChild(li);
  }
}

function addMessageElement(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return body;
}

function render() {
  renderHistory();
  $("messages").innerHTML = "";
  for (const m of current.messages) addMessageElement(m.role, m.content);
}

// -- talking to the server -----------------------------------------------------------------------

async function fetchModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelId = body.data[0].id;
    $("model-name").textContent = "model: " + modelId + " (" + body.data[0].context_length + " tokens)";
  } catch (e) {
    $("model-name").textContent = "cannot list models: " + e.message;
  }
}

// Parse server-sent events from a fetch body; calls onData with each JSON payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  if (!modelId) await fetchModel();
  if (current.messages.length === 0) current.title = text.slice(0, 40);
  current.messages.push({ role: "user", content: text });
  addMessageElement("user", text);
  save();
  renderHistory();

  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(current.messages);
  const answer = { role: "assistant", content: "" };
  const target = addMessageElement("assistant", "");
  controller = new AbortController();
  setBusy(true, "generating…");
  const started = performance.now();
  let finish = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: modelId, messages, stream: true,
                             stream_options: { include_usage: true }, ...requestParams() }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : response.status + " " + response.statusText);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer.content += choice.delta.content;
          target.textContent = answer.content;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    setBusy(false, (tokens !== null ? tokens + " tokens, " : "") + seconds.toFixed(1) + " s" +
      (tokens ? " (" + (tokens / seconds).toFixed(1) + " tok/s)" : "") + (finish ? ", finish: " + finish : ""));
  } catch (e) {
    if (e.name === "AbortError") {
      setBusy(false, "stopped");
    } else {
      addMessageElement("error", e.message);
      setBusy(false, "error");
    }
  } finally {
    controller = null;
    if (answer.content) current.messages.push(answer);
    save();
  }
}

function setBusy(busy, status) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = status || "";
}

// -- wiring --------------------------------------------------------------------------------------

function init() {
  loadSettings();
  for (const name of PARAMS.concat(["api-key"])) $(name).addEventListener("change", saveSettings);
  $("temperature").addEventListener("input", showSliderValues);
  $("top_p").addEventListener("input", showSliderValues);
  $("new-chat").addEventListener("click", () => { if (!controller) newConversation(); });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  // reopen the most recent conversation; start one if there is none
  if (conversations.length) current = conversations[0];
  else newConversation();
  render();
  fetchModel();
}

init();
