// The chat box: a conversation with the cluster through this node's /v1/chat/completions, streamed token by
// token, with the time to first token and tokens per second measured here from the chunks as they arrive.

import { $, h, seconds } from "./dom.js";
import { api, HttpError } from "./api.js";

/** The `data:` payloads of a server-sent event stream, as they arrive. */
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const blocks = buffer.split(/\r?\n\r?\n/);
      buffer = blocks.pop();
      for (const block of blocks) {
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // the reader stopped early (an error, [DONE]): let the connection go
  }
}

/** Speed of one answer: time to first token, and decode tokens per second after it. */
class Meter {
  constructor() { this.sent = performance.now(); this.first = null; this.last = null; this.tokens = 0; }
  token() {
    const now = performance.now();
    this.first ??= now;
    this.last = now;
    this.tokens += 1;
  }
  get ttft() { return this.first === null ? null : (this.first - this.sent) / 1000; }
  get tps() {
    const span = ((this.last ?? 0) - (this.first ?? 0)) / 1000;
    return this.tokens > 1 && span > 0 ? (this.tokens - 1) / span : null;
  }
  text() {
    const parts = [`${this.tokens} token${this.tokens === 1 ? "" : "s"}`];
    if (this.ttft !== null) parts.push(`first after ${seconds(this.ttft)}`);
    if (this.tps !== null) parts.push(`${this.tps.toFixed(1)} tok/s`);
    return parts.join(" · ");
  }
}

export class Chat {
  /** `onSpeed(meter, done)` hears every token's measurement, for the page's throughput readout. */
  constructor(onSpeed) {
    this.history = [];
    this.controller = null;
    this.onSpeed = onSpeed;
    this.log = $("messages");
    $("chat-form").addEventListener("submit", (event) => { event.preventDefault(); this.send(); });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); this.send(); }
    });
    $("stop").addEventListener("click", () => this.controller?.abort());
    $("clear").addEventListener("click", () => {
      this.controller?.abort();
      this.history = [];
      this.log.replaceChildren();
      this.log.append(this.placeholder());
    });
    this.log.append(this.placeholder());
  }

  placeholder() {
    return h("p", { class: "empty chat-empty" }, "Ask the cluster something. The answer streams from ",
      h("code", {}, "/v1/chat/completions"), " on this node, token by token.");
  }

  /** Fills the model picker, keeping the choice; models with a placed instance come first and are chosen by default. */
  setModels(models, placed) {
    const select = $("model");
    const chosen = select.value;
    const sorted = [...models].sort((a, b) => placed.has(b.id) - placed.has(a.id));
    const options = sorted.map((m) => {
      const note = placed.has(m.id) ? "placed" : m.downloaded === false ? "not downloaded" : "";
      return new Option(note ? `${m.id} (${note})` : m.id, m.id);
    });
    if (select.options.length === options.length && [...select.options].every((o, i) => o.text === options[i].text)) return;
    select.replaceChildren(...options);
    if (chosen && models.some((m) => m.id === chosen)) select.value = chosen;
  }

  message(role, text) {
    this.log.querySelector(".chat-empty")?.remove();
    const body = h("div", { class: "bubble" }, text);
    const element = h("div", { class: ["msg", role] }, h("div", { class: "who" }, role === "user" ? "you" : "exo"), body);
    this.log.append(element);
    this.scroll();
    return { element, body };
  }

  scroll() { this.log.scrollTop = this.log.scrollHeight; }

  busy(on) {
    $("send").hidden = on;
    $("stop").hidden = !on;
    $("chat-form").setAttribute("aria-busy", String(on));
  }

  async send() {
    const prompt = $("prompt");
    const content = prompt.value.trim();
    const model = $("model").value;
    if (!content || this.controller) return;
    if (!model) { this.message("error", "No model to ask: the node lists none."); return; }
    prompt.value = "";
    this.history.push({ role: "user", content });
    const asked = this.message("user", content);
    const answer = this.message("assistant", "");
    answer.element.classList.add("streaming");
    const stats = h("div", { class: "msg-stats", "aria-live": "off" }, "waiting for the first token…");
    answer.element.append(stats);
    const meter = new Meter();
    this.controller = new AbortController();
    this.busy(true);
    let failure = null;
    let usage = null;
    try {
      const body = { model, messages: this.history, stream: true, stream_options: { include_usage: true } };
      const maxTokens = Number($("max-tokens").value);
      const temperature = Number($("temperature").value);
      if (maxTokens > 0) body.max_tokens = maxTokens;
      if ($("temperature").value !== "" && temperature >= 0) body.temperature = temperature;
      const response = await api("/v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
        signal: this.controller.signal,
      });
      for await (const data of events(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) { failure = chunk.error.message ?? JSON.stringify(chunk.error); break; }
        usage = chunk.usage ?? usage;
        const text = chunk.choices?.[0]?.delta?.content;
        if (!text) continue;
        meter.token();
        answer.body.append(text);
        stats.textContent = meter.text();
        this.onSpeed(meter, false);
        this.scroll();
      }
    } catch (e) {
      if (e.name === "AbortError") failure = "stopped";
      else if (e instanceof HttpError && e.status === 401) failure = "This node needs an API key: enter it above, then send again.";
      else failure = e instanceof HttpError ? e.message : `the request failed: ${e.message}`;
    } finally {
      this.controller = null;
      this.busy(false);
    }
    answer.element.classList.remove("streaming");
    if (usage?.completion_tokens) meter.tokens = usage.completion_tokens;
    stats.textContent = meter.tokens ? meter.text() : "";
    const said = answer.body.textContent;
    if (failure && failure !== "stopped" && !said) {
      // nothing came back: drop the question from the conversation and give it back to edit and resend
      this.history.pop();
      asked.element.classList.add("unsent");
      answer.element.remove();
      this.message("error", failure);
      if (!prompt.value) prompt.value = content;
    } else {
      if (failure) answer.element.append(h("div", { class: failure === "stopped" ? "msg-note" : "msg-error" }, failure));
      this.history.push({ role: "assistant", content: said });
    }
    if (meter.tokens) this.onSpeed(meter, true);
    prompt.focus();
  }
}
