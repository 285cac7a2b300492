/* What the page keeps in localStorage: the conversations and the generation settings, plus the sampling
   presets and how settings turn into the request's sampling fields. */

export const DEFAULT_SYSTEM = "You are a helpful assistant.";
const CHATS_KEY = "qwen-awq.chats.v1";
const SETTINGS_KEY = "qwen-awq.settings.v1";
// "defaults" sends no sampling fields, so the server applies the model's generation_config.json.
export const PRESETS = {
  deterministic: { temperature: "0", topP: "" },
  defaults: { temperature: "", topP: "" },
  creative: { temperature: "1", topP: "0.95" },
};

function loadJson(key) {
  try {
    return JSON.parse(localStorage.getItem(key));
  } catch {
    return null;  // unreadable storage (corrupt JSON or storage disabled): start fresh
  }
}

/** False when the browser refuses (quota full, storage disabled); the caller tells the user. */
function saveJson(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

// Not crypto.randomUUID: that exists only in secure contexts, and the page may be opened over plain http.
const newId = () => `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;

export class ChatStore {
  constructor() {
    const saved = loadJson(CHATS_KEY);
    const chats = Array.isArray(saved?.chats) ? saved.chats : [];
    this.chats = chats.filter((c) => typeof c?.id === "string" && Array.isArray(c.messages));
    this.currentId = saved?.currentId ?? null;
    if (!this.current()) this.currentId = this.chats[0]?.id ?? this.create(DEFAULT_SYSTEM).id;
  }

  current() {
    return this.chats.find((c) => c.id === this.currentId);
  }

  create(system) {
    const chat = { id: newId(), title: "", system, messages: [], updated: Date.now() };
    this.chats.unshift(chat);
    this.currentId = chat.id;
    return chat;
  }

  remove(id) {
    this.chats = this.chats.filter((c) => c.id !== id);
    if (!this.chats.length) this.create(DEFAULT_SYSTEM);
    if (!this.current()) this.currentId = this.chats[0].id;
  }

  /** Most recently used first, as the sidebar lists them. */
  sorted() {
    return [...this.chats].sort((a, b) => b.updated - a.updated);
  }

  save() {
    return saveJson(CHATS_KEY, { chats: this.chats, currentId: this.currentId });
  }
}

export function loadSettings() {
  const saved = loadJson(SETTINGS_KEY);
  const settings = { preset: "defaults", temperature: "", topP: "", maxTokens: "", apiKey: "" };
  for (const key of Object.keys(settings)) {
    if (typeof saved?.[key] === "string") settings[key] = saved[key];
  }
  return settings;
}

export const saveSettings = (settings) => saveJson(SETTINGS_KEY, settings);

/** The preset whose values the temperature and top_p fields hold, else "custom". */
export function presetOf(settings) {
  const match = Object.entries(PRESETS)
    .find(([, p]) => p.temperature === settings.temperature && p.topP === settings.topP);
  return match ? match[0] : "custom";
}

/** Empty fields are left out, so the server falls back to the model's own defaults. */
export function samplingFields(settings) {
  const fields = {};
  if (settings.temperature !== "") fields.temperature = Number(settings.temperature);
  if (settings.topP !== "") fields.top_p = Number(settings.topP);
  if (settings.maxTokens !== "") fields.max_tokens = Number(settings.maxTokens);
  return fields;
}
