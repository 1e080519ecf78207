// ember chat page: streams /v1/chat/completions (server-sent events) into the log; in compare mode asks two
// models (or one model with two seeds) the same prompt side by side and posts the vote to /api/votes.
"use strict";
const $ = (id) => document.getElementById(id);
let history = [];        // [{role, content}] of the single-model conversation
let lastCompare = null;  // {a, b, prompt, answer_a, answer_b, seed_a, seed_b, temperature} awaiting a vote
let busy = false;
let aborter = new AbortController();  // "new chat" aborts what is still streaming

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text; }

function bubble(role, who, parent) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const tag = document.createElement("span");
  tag.className = "who";
  tag.textContent = who;
  const body = document.createElement("span");
  body.className = "text";
  div.append(tag, body);
  div.dataset.chunks = "0";
  (parent || $("log")).append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function samplingParams() {
  const p = { temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value) };
  const max = $("max_tokens").value.trim();  // blank: the server gives what the context has room for
  if (max !== "") p.max_tokens = parseInt(max, 10);
  const seed = $("seed").value.trim();
  if (seed !== "") p.seed = parseInt(seed, 10);
  return p;
}

function apiError(status, error) {  // an Error carrying the server's OpenAI-style code (e.g. context_length_exceeded)
  const e = new Error(error && error.message ? error.message : String(status));
  e.code = error && error.code;
  e.status = status;
  if (status === 401) { $("settings").open = true; $("key-row").hidden = false; $("api_key").focus(); }
  return e;
}

// POST a streaming chat request; append each delta to `div`; resolve with the full answer text.
async function streamChat(model, messages, params, div) {
  div.classList.add("streaming");
  const body = JSON.stringify({ model, messages, stream: true, ...params });
  const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body, signal: aborter.signal });
  if (!res.ok) {
    let error = { message: res.status + " " + res.statusText };
    try { error = (await res.json()).error; } catch (e) { /* keep the status line */ }
    throw apiError(res.status, error);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const out = div.querySelector(".text");
  let buffer = "", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") { div.classList.remove("streaming"); return text; }
      const obj = JSON.parse(data);
      if (obj.error) throw apiError(200, obj.error);
      const delta = obj.choices && obj.choices[0] && obj.choices[0].delta.content;
      if (delta) {
        text += delta;
        out.textContent = text.trimStart();  // a base model often starts its continuation with a space
        div.dataset.chunks = String(parseInt(div.dataset.chunks, 10) + 1);
      }
    }
  }
  div.classList.remove("streaming");
  return text;
}

async function send(prompt) {
  const params = samplingParams();
  const comparing = $("compare").checked;
  bubble("user", "you", null).querySelector(".text").textContent = prompt;
  $("votebar").hidden = true;
  if (!comparing) {
    const chat = history;  // "new chat" replaces history: an answer still streaming must not land in the new one
    chat.push({ role: "user", content: prompt });
    const div = bubble("assistant", $("model").value);
    let dropped = 0;
    for (;;) {
      try {
        const answer = await streamChat($("model").value, chat, params, div);
        chat.push({ role: "assistant", content: answer });
        return dropped ? "done (the conversation outgrew the model's context: dropped its oldest " + dropped +
                         " exchange" + (dropped > 1 ? "s" : "") + ")" : "";
      } catch (e) {
        if (e.code === "context_length_exceeded" && chat.length > 2) {  // forget the oldest exchange, retry
          chat.splice(0, 2);
          dropped += 1;
          continue;
        }
        chat.pop();  // a prompt that failed is not resent with the next one
        throw e;
      }
    }
  }
  // compare: a fresh single-turn question to both sides; the same model twice differs by seed. Which model
  // answers on the left is drawn at random, so a position bias cannot favour one model in the ratings.
  let a = $("model").value, b = $("model-b").value;
  if (Math.random() < 0.5) [a, b] = [b, a];
  const base = params.seed !== undefined ? params.seed : Math.floor(Math.random() * 1e9);
  const pa = { ...params, seed: base }, pb = { ...params, seed: base + 1 };
  const row = document.createElement("div");
  row.className = "turn";
  $("log").append(row);
  const da = bubble("assistant", "A", row), db = bubble("assistant", "B", row);
  const messages = [{ role: "user", content: prompt }];
  const [ansA, ansB] = await Promise.all([streamChat(a, messages, pa, da), streamChat(b, messages, pb, db)]);
  lastCompare = { a, b, prompt, answer_a: ansA, answer_b: ansB, seed_a: pa.seed, seed_b: pb.seed,
                  temperature: params.temperature };
  $("votebar").hidden = false;
}

async function vote(winner) {
  const pending = lastCompare;
  if (!pending) return;
  lastCompare = null;  // one vote per comparison, however fast the clicks
  $("votebar").hidden = true;
  try {
    const res = await fetch("/api/votes", { method: "POST", headers: headers(),
                                            body: JSON.stringify({ ...pending, winner }) });
    if (!res.ok) throw new Error(String(res.status));
    status("vote recorded: " + winner + " (models revealed: A = " + pending.a + ", B = " + pending.b + ")");
  } catch (e) {
    lastCompare = pending;  // let the user try again
    $("votebar").hidden = false;
    status("vote failed: " + e.message);
  }
}

async function loadModels() {
  const info = await (await fetch("/api/info")).json();
  $("key-row").hidden = !info.auth;
  if (info.auth) $("settings").open = true;  // the key is needed before the first message
  if (info.max_tokens) $("max_tokens").max = info.max_tokens;
  for (const sel of [$("model"), $("model-b")]) {
    sel.innerHTML = "";
    for (const name of info.models) sel.append(new Option(name, name));
  }
  if (info.models.length > 1) $("model-b").value = info.models[1];
  $("compare").disabled = !info.votes;
  status("ready: " + info.models.join(", "));
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || busy) return;
  busy = true;
  $("send").disabled = true;
  $("prompt").value = "";
  status("generating…");
  try {
    const note = await send(prompt);
    status(note || "done");
  } catch (e) {
    if (e.name === "AbortError") { status("stopped"); return; }
    const div = bubble("assistant error", "error");
    div.querySelector(".text").textContent = e.message;
    status("error: " + e.message);
  } finally {
    document.querySelectorAll(".streaming").forEach((d) => d.classList.remove("streaming"));
    busy = false;
    $("send").disabled = false;
  }
});
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("compare").addEventListener("change", () => {
  document.body.classList.toggle("comparing", $("compare").checked);
  $("votebar").hidden = true;
});
$("clear").addEventListener("click", () => {
  aborter.abort();  // stop what is streaming (the server frees its slot) and start a new conversation
  aborter = new AbortController();
  history = [];
  lastCompare = null;
  $("log").innerHTML = "";
  $("votebar").hidden = true;
});
document.querySelectorAll("#votebar button").forEach((b) => b.addEventListener("click", () => vote(b.dataset.winner)));
loadModels().catch((e) => status("cannot reach the server: " + e.message));
