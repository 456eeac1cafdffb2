// LatentMAS Stack web UI: streaming chat through /reasoning/chat/stream, experts and their versions,
// conversations, and the evolution trigger. Plain DOM, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { conversation: null, session: localStorage.getItem("latentmas-session") || crypto.randomUUID() };
localStorage.setItem("latentmas-session", state.session);

// Bearer token for servers started with LATENTMAS_API_TOKEN; kept in this browser only.
function api(path, init = {}) {
  const token = localStorage.getItem("latentmas-token");
  const headers = { ...(init.headers || {}), ...(token ? { Authorization: `Bearer ${token}` } : {}) };
  return fetch(path, { ...init, headers });
}

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
}

function addMessage(role, text) {
  const box = el("div", { class: `msg ${role}` });
  box.append(el("div", { class: "who" }, role === "user" ? "you" : "assistant"), el("div", { class: "text" }, text));
  $("#messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function showMeta(box, meta) {
  let badges = box.querySelector(".badges");
  if (!badges) { badges = el("div", { class: "badges" }); box.append(badges); }
  badges.replaceChildren();
  const conf = Number(meta.domain_confidence ?? 0).toFixed(2);
  badges.append(el("span", { class: "badge expert", "data-expert": meta.adapter || "base" }, `expert: ${meta.adapter || "base"} (${conf})`));
  badges.append(el("span", { class: "badge" }, `pipeline: ${meta.pipeline}`));
  if (meta.cached) badges.append(el("span", { class: "badge" }, "cached"));
  if (meta.latent_steps) badges.append(el("span", { class: "badge" }, `latent steps: ${meta.latent_steps}`));
  if (meta.generated_tokens !== undefined) badges.append(el("span", { class: "badge" }, `tokens: ${meta.generated_tokens}`));
  if (meta.cache_length) badges.append(el("span", { class: "badge" }, `KV length: ${meta.cache_length}`));
  box.querySelector(".citations")?.remove();
  if (meta.citations && meta.citations.length) {
    const list = el("ol", { class: "citations" });
    for (const c of meta.citations) list.append(el("li", { "data-id": c.id }, `[${c.n}] ${c.source}: ${c.text.slice(0, 120)}`));
    box.append(list);
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("#prompt").value.trim();
  if (!prompt) return;
  addMessage("user", prompt);
  $("#prompt").value = "";
  const box = addMessage("assistant", "");
  box.dataset.state = "streaming";
  const body = {
    prompt, session_id: state.session, conversation_id: state.conversation,
    max_tokens: Number($("#max-tokens").value) || 128, no_default_data: $("#no-default-data").checked,
    rag_documents: $("#documents").value.split("\n").map((s) => s.trim()).filter(Boolean),
  };
  if ($("#pipeline").value) body.pipeline = $("#pipeline").value;
  $("#documents").value = "";
  $("#send").disabled = true;
  try {
    const response = await api("/reasoning/chat/stream", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = frame.split("\n").find((line) => line.startsWith("data: "));
        if (data) handle(box, JSON.parse(data.slice(6)));
      }
    }
  } catch (err) {
    box.querySelector(".text").textContent = `error: ${err.message}`;
    box.dataset.state = "error";
  } finally {
    $("#send").disabled = false;
    loadConversations();
  }
}

function handle(box, event) {
  const text = box.querySelector(".text");
  if (event.event === "meta") {
    state.conversation = event.conversation_id;
    showMeta(box, event);
  } else if (event.event === "token") {
    text.textContent += event.text;
  } else if (event.event === "done") {
    text.textContent = event.response;
    showMeta(box, event);
    box.dataset.state = "done";
  } else if (event.event === "error") {
    text.textContent = `error: ${event.message}`;
    box.dataset.state = "error";
  }
}

async function loadExperts() {
  try {
    const response = await api("/reasoning/experts");
    if (!response.ok) throw new Error(response.status === 401 ? "set the API token in Options" : `HTTP ${response.status}`);
    const data = await response.json();
    const rows = data.experts.map((e) => {
      const tr = el("tr", { "data-expert": e.name });
      const stale = e.target !== null && e.active !== e.target;
      tr.append(el("td", {}, e.name), el("td", stale ? { class: "stale" } : {}, e.active ?? "–"), el("td", {}, e.target ?? "–"));
      return tr;
    });
    $("#experts tbody").replaceChildren(...rows);
    $("#index-version").textContent = `active ${data.index.active ?? "–"} / target ${data.index.target ?? "–"}`;
    $("#status").textContent = "ready";
  } catch (err) {
    $("#status").textContent = `unreachable: ${err.message}`;
  }
}

async function loadConversations() {
  const response = await api(`/reasoning/conversations?session_id=${encodeURIComponent(state.session)}`);
  if (!response.ok) return;
  const data = await response.json();
  const items = data.conversations.map((c) => {
    const li = el("li", { "data-id": c.conversation_id }, c.title || c.conversation_id);
    li.addEventListener("click", () => openConversation(c.conversation_id));
    return li;
  });
  $("#conversations").replaceChildren(...items);
}

async function openConversation(id) {
  const data = await (await api(`/reasoning/conversations/${id}`)).json();
  state.conversation = id;
  $("#messages").replaceChildren();
  for (const m of data.messages) {
    const box = addMessage(m.role, m.content);
    if (m.role === "assistant" && m.pipeline) showMeta(box, m);
  }
}

async function evolve() {
  $("#evolve").disabled = true;
  try {
    const response = await api("/reasoning/evolve", { method: "POST" });
    const data = await response.json();
    $("#evolve-result").textContent = response.ok ? `cycle requested (nonce ${data.nonce})` : `failed: ${data.error.message}`;
  } finally {
    $("#evolve").disabled = false;
  }
}

$("#token").value = localStorage.getItem("latentmas-token") || "";
$("#token").addEventListener("change", () => { localStorage.setItem("latentmas-token", $("#token").value.trim()); loadExperts(); });
$("#ask").addEventListener("submit", send);
$("#evolve").addEventListener("click", evolve);
$("#new-chat").addEventListener("click", () => { state.conversation = null; $("#messages").replaceChildren(); });
$("#prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e); });
loadExperts();
loadConversations();
setInterval(loadExperts, 10000);
