/* The chat page: conversations kept in localStorage, streamed replies with Stop and Regenerate, sampling
   presets and a context-usage meter. Model text reaches the DOM only as text nodes (see markdown.js). */
import { Api } from "./api.js";
import { ContextMeter } from "./context.js";
import { ChatStore, PRESETS, loadSettings, presetOf, samplingFields, saveSettings } from "./store.js";
import { chatListItem, fillMessage, messageView } from "./views.js";

const ui = Object.fromEntries([
  "new-chat", "chat-list", "settings", "preset", "temperature", "top-p", "max-tokens", "api-key",
  "chat-title", "model-name", "context", "context-meter", "context-text", "system-prompt", "system-preview",
  "messages", "error", "error-text", "error-retry", "error-close", "composer", "prompt", "regenerate", "stop",
  "send",
].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), document.getElementById(id)]));

const store = new ChatStore();
const state = {
  settings: loadSettings(),
  model: null,
  running: null,  // {controller, chat} while a reply streams
};
const api = new Api(state.settings.apiKey);
const currentChat = () => store.current();
const meter = new ContextMeter(api, { box: ui.context, meter: ui.contextMeter, text: ui.contextText },
  nextPrompt, () => Number(state.settings.maxTokens) || 0);

function saveChats() {
  if (!store.save()) showError("Could not save to this browser's storage (full or disabled).");
}

function saveSettingsOrWarn() {
  if (!saveSettings(state.settings)) showError("Could not save the settings to this browser's storage.");
}

/* ---------- rendering ---------- */

function renderChatList() {
  ui.chatList.replaceChildren(...store.sorted().map((chat) => chatListItem(chat, chat.id === store.currentId,
    () => switchChat(chat.id), () => deleteChat(chat.id))));
}

function renderConversation() {
  const chat = currentChat();
  ui.chatTitle.textContent = chat.title || "New chat";
  ui.systemPrompt.value = ui.systemPreview.textContent = chat.system;
  ui.messages.replaceChildren(...chat.messages.map(messageView));
  if (!chat.messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Start the conversation below.";
    ui.messages.append(empty);
  }
  ui.messages.scrollTop = ui.messages.scrollHeight;
  updateButtons();
}

function updateButtons() {
  const chat = currentChat();
  const running = state.running !== null;
  ui.send.disabled = running;
  ui.stop.hidden = !running;
  ui.regenerate.disabled = running || !chat.messages.some((m) => m.role === "user");
}

function showError(message, kind = "local") {
  ui.errorText.textContent = message;
  ui.error.dataset.kind = kind;
  ui.errorRetry.hidden = !["busy", "network", "stream", "http"].includes(kind);
  ui.error.hidden = false;
}

const hideError = () => { ui.error.hidden = true; };

/* ---------- generation ---------- */

function apiMessages(chat) {
  const turns = chat.messages.map(({ role, content }) => ({ role, content }));
  return chat.system.trim() ? [{ role: "system", content: chat.system }, ...turns] : turns;
}

/** The prompt the next send would make: the chat plus the draft as a user turn (an empty one when nothing is
    typed, as the chat template needs the user's turn last); while a reply is pending it already ends so. */
function nextPrompt() {
  const messages = apiMessages(currentChat());
  if (messages.at(-1)?.role !== "user") messages.push({ role: "user", content: ui.prompt.value });
  return messages;
}

function requestBody(chat) {
  const model = state.model ? { model: state.model } : {};
  return { ...model, messages: apiMessages(chat), stream: true, ...samplingFields(state.settings) };
}

async function generate(chat) {
  hideError();
  const body = requestBody(chat);
  const reply = { role: "assistant", content: "" };
  const view = messageView(reply);
  view.setAttribute("aria-busy", "true");  // screen readers announce the reply once, when it is complete
  ui.messages.querySelector(".empty")?.remove();
  ui.messages.append(view);
  state.running = { controller: new AbortController(), chat };
  updateButtons();
  let frame = 0;
  let failed = null;
  try {
    for await (const event of api.streamChat(body, state.running.controller.signal)) {
      if (event.finish) reply.finish = event.finish;
      if (!event.content) continue;
      reply.content += event.content;
      // Re-render at most once per frame: a fast stream must not re-parse the Markdown per token.
      frame ||= requestAnimationFrame(() => { frame = 0; fillMessage(view, reply); followBottom(); });
    }
  } catch (err) {
    if (err.name === "AbortError") reply.stopped = true;
    else failed = err;
  } finally {
    cancelAnimationFrame(frame);
    state.running = null;
    finishReply(chat, reply, failed);
  }
}

function finishReply(chat, reply, failed) {
  if (failed && !reply.content && chat === currentChat()) {
    restoreFailedMessage(chat);
  } else {
    // Even an empty reply is kept: user and assistant turns must alternate, or the server rejects the chat.
    reply.failed = failed !== null;
    chat.messages.push(reply);
    chat.updated = Date.now();
  }
  saveChats();
  if (chat === currentChat()) renderConversation();
  renderChatList();
  updateButtons();
  if (failed) showError(failed.message, failed.kind);
  meter.schedule(0);
}

/** A message that got no reply goes back into the input box (before any newer draft), so a context-too-long
    message does not stay in the history and make every later request fail too; Retry or Enter resends it. */
function restoreFailedMessage(chat) {
  if (chat.messages.at(-1)?.role !== "user") return;
  const last = chat.messages.pop();
  if (!chat.messages.length) chat.title = "";
  ui.prompt.value = [last.content, ui.prompt.value].filter((text) => text.trim()).join("\n\n");
}

function followBottom() {
  const m = ui.messages;
  if (m.scrollHeight - m.scrollTop - m.clientHeight < 120) m.scrollTop = m.scrollHeight;
}

function send() {
  const text = ui.prompt.value;
  if (!text.trim() || state.running) return;
  if (!ui.settings.reportValidity()) return;
  const chat = currentChat();
  chat.messages.push({ role: "user", content: text });
  chat.title ||= text.trim().replace(/\s+/g, " ").slice(0, 60);
  chat.updated = Date.now();
  saveChats();
  ui.prompt.value = "";
  renderConversation();
  renderChatList();
  generate(chat);
}

/** Drop the last reply (if any) and ask again for the last user message. */
function regenerate() {
  const chat = currentChat();
  if (state.running || !chat.messages.some((m) => m.role === "user")) return;
  if (!ui.settings.reportValidity()) return;
  while (chat.messages.at(-1).role === "assistant") chat.messages.pop();
  saveChats();
  renderConversation();
  generate(chat);
}

const stop = () => state.running?.controller.abort();

/* ---------- conversations ---------- */

function switchChat(id) {
  stop();
  store.currentId = id;
  saveChats();
  hideError();
  renderChatList();
  renderConversation();
  meter.schedule(0);
}

function startNewChat() {
  stop();
  const current = currentChat();
  // An untouched chat is reused, so pressing New chat twice does not litter the list.
  if (current.messages.length) store.create(current.system);
  switchChat(store.currentId);
  ui.prompt.focus();
}

function deleteChat(id) {
  if (state.running?.chat.id === id) stop();
  store.remove(id);
  switchChat(store.currentId);
}

/* ---------- settings and the server ---------- */

function renderSettings() {
  const s = state.settings;
  ui.preset.value = s.preset;
  ui.temperature.value = s.temperature;
  ui.topP.value = s.topP;
  ui.maxTokens.value = s.maxTokens;
  ui.apiKey.value = s.apiKey;
}

function onPreset() {
  Object.assign(state.settings, { preset: ui.preset.value }, PRESETS[ui.preset.value] ?? {});
  saveSettingsOrWarn();
  renderSettings();
}

function onSamplingInput() {
  const s = Object.assign(state.settings, {
    temperature: ui.temperature.value.trim(),
    topP: ui.topP.value.trim(),
    maxTokens: ui.maxTokens.value.trim(),
  });
  ui.preset.value = s.preset = presetOf(s);
  saveSettingsOrWarn();
  meter.schedule(0);
}

async function connect() {
  try {
    const info = await api.modelInfo();
    state.model = meter.model = info.id;
    meter.maxLen = info.maxLen;
    ui.modelName.textContent = info.id;
  } catch (err) {
    ui.modelName.textContent = "not connected";
    showError(err.message, err.kind);
  }
  meter.schedule(0);
}

/* ---------- wiring ---------- */

function wire() {
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.settings.addEventListener("submit", (e) => e.preventDefault());
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !e.altKey && !e.ctrlKey && !e.metaKey) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.running) stop(); });
  ui.prompt.addEventListener("input", () => meter.schedule());
  ui.stop.addEventListener("click", stop);
  ui.regenerate.addEventListener("click", regenerate);
  ui.newChat.addEventListener("click", startNewChat);
  ui.errorRetry.addEventListener("click", () => (ui.prompt.value.trim() ? send() : regenerate()));
  ui.errorClose.addEventListener("click", hideError);
  ui.systemPrompt.addEventListener("input", () => {
    currentChat().system = ui.systemPreview.textContent = ui.systemPrompt.value;
    saveChats();
    meter.schedule();
  });
  ui.preset.addEventListener("change", () => { onPreset(); meter.schedule(0); });
  for (const input of [ui.temperature, ui.topP, ui.maxTokens]) {
    input.addEventListener("input", onSamplingInput);
  }
  ui.apiKey.addEventListener("change", () => {
    state.settings.apiKey = api.apiKey = ui.apiKey.value.trim();
    saveSettingsOrWarn();
    hideError();
    connect();
  });
}

wire();
renderSettings();
renderChatList();
renderConversation();
connect();
