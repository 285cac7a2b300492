/* The context-usage meter: prompt tokens the next message would use (the chat plus the unsent draft), from
   the server's /tokenize, against the model's context length from /v1/models, /info or /tokenize. */

const TOKENIZE_DELAY_MS = 300;  // debounce while typing: one /tokenize per pause, not per key

export class ContextMeter {
  /** messages(): the chat as it would be sent; reserve(): tokens kept for the reply (Max tokens, or 0). */
  constructor(api, elements, messages, reserve) {
    this.api = api;
    this.el = elements;  // {box, meter, text}
    this.messages = messages;
    this.reserve = reserve;
    this.model = null;
    this.maxLen = null;
    this.seq = 0;
    this.timer = 0;
  }

  schedule(delay = TOKENIZE_DELAY_MS) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), delay);
  }

  async refresh() {
    const seq = ++this.seq;
    let count = null;
    try {
      const reply = await this.api.countTokens(this.model, this.messages());
      count = reply.count;
      this.maxLen = reply.maxLen ?? this.maxLen;
    } catch { /* the meter shows "–"; chatting still works without /tokenize */ }
    if (seq === this.seq) this.show(count);  // a slower, older answer must not overwrite a newer one
  }

  show(count) {
    const max = this.maxLen;
    this.el.text.textContent = `${count ?? "–"} / ${max ?? "–"} tokens`;
    this.el.meter.max = max ?? 1;
    this.el.meter.value = count ?? 0;
    // Warn at 90%: the reply itself needs room, and generation stops when the context is full.
    const full = count !== null && max !== null && count + this.reserve() >= max * 0.9;
    this.el.box.classList.toggle("near-full", full);
    this.el.box.title = full ? "Nearly full: start a new chat or lower Max tokens."
      : "Prompt tokens your next message would use (this chat plus the draft) / the model's context length";
  }
}
