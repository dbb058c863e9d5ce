// Placing and removing models, as exo's upstream dashboard does: pick a model from the registry, see the
// planner's previews (which nodes, which layers, how much memory on each), place one, delete an instance.
// Its runners' loading shows in the instance's card like any other's.

import { $, bytes, h, patch, shortId } from "./dom.js";
import { api, getJSON } from "./api.js";

const PREVIEWS_EVERY_MS = 5000;  // free memory moves, and with it where a model fits

export class Placer {
  /** `changed` is called after a placement or deletion, so the page polls the state at once. */
  constructor(changed) {
    this.changed = changed;
    this.select = $("place-model");
    this.answer = null;   // the last /instance/previews body, or {error}
    this.at = -Infinity;
    this.view = null;
    this.select.addEventListener("change", () => this.refresh(true));
    $("instances").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-delete]");
      if (button) this.remove(button.dataset.delete, button);
    });
  }

  /** Called on every poll with the page's view of the state and the models of GET /v1/models. */
  update(view, models) {
    this.view = view;
    const ids = models.map((m) => m.id);
    if ([...this.select.options].map((o) => o.value).join("\n") !== ids.join("\n")) {
      const chosen = this.select.value;
      this.select.replaceChildren(new Option("pick a model…", ""), ...ids.map((id) => new Option(id, id)));
      if (ids.includes(chosen)) this.select.value = chosen;
    }
    this.refresh(false);
  }

  async refresh(now) {
    const model = this.select.value;
    if (!model) {
      this.answer = null;
    } else if (now || performance.now() - this.at > PREVIEWS_EVERY_MS) {
      this.at = performance.now();
      this.answer = await getJSON(`/instance/previews?model_id=${encodeURIComponent(model)}`)
        .catch((e) => ({ modelId: model, error: e.message }));
    }
    this.render();
  }

  render() {
    const container = $("previews");
    const answer = this.answer;
    if (!answer || answer.modelId !== this.select.value) {
      patch(container, [h("p", { class: "empty" }, "Pick a model to see where the planner would place it.")]);
    } else if (answer.error) {
      patch(container, [h("p", { class: "place-error" }, answer.error)]);
    } else if (!answer.previews.length) {
      patch(container, [h("p", { class: "place-error" },
        `${answer.modelId} fits on no set of nodes that take work: free memory, raise --max-memory, or add a machine.`)]);
    } else {
      patch(container, answer.previews.map((preview) => this.card(answer, preview)));
    }
  }

  card(answer, preview) {
    const label = (id) => this.view?.labels.get(id) ?? shortId(id);
    const n = preview.shards.length;
    return h("article", { class: "preview", "data-nodes": n },
      h("header", {}, h("strong", {}, `${n} node${n === 1 ? "" : "s"}`),
        h("button", { type: "button", "data-place": n, onclick: (e) => this.place(answer.modelId, n, e.currentTarget) },
          `Place on ${n} node${n === 1 ? "" : "s"}`)),
      h("table", { class: "preview-shards" },
        h("thead", {}, h("tr", {}, ["rank", "node", "layers", "memory"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, preview.shards.map((s) => h("tr", { "data-node-id": s.nodeId },
          h("td", {}, s.rank),
          h("td", { style: { color: this.view?.colors.get(s.nodeId) } }, label(s.nodeId)),
          h("td", {}, `${s.start}–${s.end} of ${answer.nLayers}`),
          h("td", {}, bytes(s.memoryBytes)))))));
  }

  async place(model, nodes, button) {
    await this.act(button, `Placing ${model} on ${nodes} node${nodes === 1 ? "" : "s"}…`, async () => {
      const response = await api("/place_instance", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ modelId: model, minNodes: nodes }),
      });
      const [body] = Object.values(await response.json());  // tagged by its kind
      return `Placed ${model} as ${body.instanceId}: its runners load below.`;
    });
  }

  async remove(instanceId, button) {
    await this.act(button, `Deleting ${instanceId}…`, async () => {
      await api(`/instance/${encodeURIComponent(instanceId)}`, { method: "DELETE" });
      return `Deleted ${instanceId}.`;
    });
  }

  async act(button, doing, action) {
    const status = $("place-status");
    button.disabled = true;
    status.className = "place-status";
    status.textContent = doing;
    try {
      status.textContent = await action();
    } catch (e) {
      status.className = "place-status place-error";
      status.textContent = e.message;
    } finally {
      button.disabled = false;
    }
    this.changed();
    this.refresh(true);
  }
}
