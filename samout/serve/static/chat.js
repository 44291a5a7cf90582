// The chat page's script (samout/serve/static/index.html).
"use strict";
const $ = (id) => document.getElementById(id);
let history = [];        // [{role, content}] of this conversation
let models = {};         // id -> model card from /v1/models
let controller = null;   // AbortController of the running request

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;   // never innerHTML: model output is untrusted text
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = busy ? "generating…" : "";
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", {headers: headers()});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    $("model").innerHTML = "";
    for (const m of body.data) {
      models[m.id] = m;
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.id + (m.chat ? "" : " (no chat template: plain completion)");
      $("model").appendChild(opt);
    }
  } catch (err) {
    addMessage("error", "could not list models: " + err.message);
  }
}

function requestFor(model) {
  const body = {
    model: model, stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: parseInt($("max-tokens").value, 10),
  };
  if (models[model] && models[model].chat) {
    body.messages = history;
    return ["/v1/chat/completions", body];
  }
  // Without a chat template the conversation is continued as plain text.
  body.prompt = history.map((m) => m.content).join("\n");
  return ["/v1/completions", body];
}

// Yields the parsed JSON of each `data:` event of an SSE response until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  history.push({role: "user", content: text});
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const [path, body] = requestFor($("model").value);
  controller = new AbortController();
  setBusy(true);
  let reply = "";
  try {
    const r = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body),
                                 signal: controller.signal});
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    for await (const chunk of events(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta ? (choice.delta.content || "") : (choice.text || "");
      if (piece) {
        reply += piece;
        bubble.textContent = reply;
        bubble.scrollIntoView({block: "end"});
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") addMessage("error", err.message);
  } finally {
    history.push({role: "assistant", content: reply});
    controller = null;
    setBusy(false);
    $("input").focus();
  }
}

function stop() {
  if (controller) controller.abort();   // the server frees the slot when the stream closes
}

function newChat() {
  stop();
  history = [];
  $("messages").innerHTML = "";
  $("input").value = "";
  $("input").focus();
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", newChat);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("api-key").addEventListener("change", loadModels);
loadModels();
