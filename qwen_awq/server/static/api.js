/* The page's calls to the qwen-awq server: OpenAI chat streaming over SSE, /tokenize and the model's limits.
   Every failure becomes an ApiError whose message tells the user what to do. Paths are relative, so the page
   also works behind a reverse proxy that mounts the server under a prefix. */

export class ApiError extends Error {
  /** kind: "busy" | "context" | "auth" | "http" | "network" | "stream" */
  constructor(message, kind, status) {
    super(message);
    this.name = "ApiError";
    this.kind = kind;
    this.status = status;
  }
}

function serverMessage(body, fallback) {
  if (body?.error?.message) return body.error.message;  // OpenAI / vLLM body
  if (typeof body?.error === "string") return body.error;  // TGI body
  if (body?.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  return fallback;
}

async function errorFromResponse(resp) {
  const text = await resp.text().catch(() => "");
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON: show the raw text */ }
  const said = serverMessage(body, text.slice(0, 300) || resp.statusText);
  const status = resp.status;
  if (status === 429 || status === 503) {
    const wait = resp.headers.get("Retry-After");
    const when = wait ? `in ${wait} s` : "in a moment";
    const message = `The server is busy with other requests. Try again ${when}. (${said})`;
    return new ApiError(message, "busy", status);
  }
  if (status === 400 && /context length|too long|maximum context/i.test(said)) {
    return new ApiError(`This conversation is too long for the model's context window: ${said} `
      + "Start a new chat, shorten your message, or lower Max tokens.", "context", status);
  }
  if (status === 401 || status === 403) {
    const message = `The server needs an API key: enter it under Settings › API key. (${said})`;
    return new ApiError(message, "auth", status);
  }
  return new ApiError(`Request failed (HTTP ${status}): ${said}`, "http", status);
}

export class Api {
  constructor(apiKey) {
    this.apiKey = apiKey;
  }

  headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (this.apiKey) h.Authorization = `Bearer ${this.apiKey}`;
    return h;
  }

  async request(path, body, signal) {
    const post = body !== undefined;
    const init = { method: post ? "POST" : "GET", headers: this.headers(post), signal };
    if (post) init.body = JSON.stringify(body);
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      if (err.name === "AbortError") throw err;
      const message = `Cannot reach the server at ${location.origin}. Is \`qwen-awq serve\` still running?`;
      throw new ApiError(message, "network", 0);
    }
    if (!resp.ok) throw await errorFromResponse(resp);
    return resp;
  }

  /** The served model's id and context length (from /v1/models, else TGI's /info). */
  async modelInfo() {
    const models = await (await this.request("v1/models")).json();
    const entry = models.data?.[0];
    if (!entry) throw new ApiError("The server lists no model at /v1/models.", "http", 200);
    let maxLen = entry.max_model_len ?? null;
    if (maxLen === null) {
      const info = await this.request("info").then((r) => r.json()).catch(() => null);
      maxLen = info?.max_total_tokens ?? null;
    }
    return { id: entry.id, maxLen };
  }

  /** Tokens the chat template makes of `messages`, and the context length the server reports. */
  async countTokens(model, messages, signal) {
    const body = model ? { model, messages } : { messages };
    const reply = await (await this.request("tokenize", body, signal)).json();
    return { count: reply.count, maxLen: reply.max_model_len ?? null };
  }

  /** Yields {content} pieces and a final {finish}; aborting `signal` closes the connection, which the
      server takes as a cancel and frees the request's KV cache. */
  async *streamChat(body, signal) {
    const resp = await this.request("v1/chat/completions", body, signal);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        const events = buffer.split(/\r?\n\r?\n/);
        buffer = events.pop();
        for (const event of events) {
          const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (!data) continue;
          if (data === "[DONE]") return;
          yield* parseChunk(data);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }
}

function* parseChunk(data) {
  let chunk;
  try {
    chunk = JSON.parse(data);
  } catch {
    throw new ApiError(`The server sent a malformed stream event: ${data.slice(0, 200)}`, "stream", 200);
  }
  if (chunk.error) {
    const message = `The reply stopped with an error: ${serverMessage(chunk, "unknown error")}`;
    throw new ApiError(message, "stream", 200);
  }
  const choice = chunk.choices?.[0];
  if (choice?.delta?.content) yield { content: choice.delta.content };
  if (choice?.finish_reason) yield { finish: choice.finish_reason };
}
