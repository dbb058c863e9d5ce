// The dashboard's loop: fetch this node's view of the cluster every second and redraw what changed.

import { $, h, nodeColors, s, seconds, shortId, tone } from "./dom.js";
import { getJSON, setupKeyForm } from "./api.js";
import { Chat } from "./chat.js";
import { renderExtras, renderInstances, renderTasks, untagInstances } from "./instances.js";
import { nodeLabels, renderTopology, watchTopologySize } from "./topology.js";
import { Placer } from "./place.js";

const POLL_MS = 1000;
const MODELS_EVERY_MS = 15000;
const LOCKED_POLL_MS = 30000;  // without a key; entering one polls at once

let lastGood = 0;       // when the state last arrived (performance.now())
let modelsAt = -Infinity;
let models = [];
let wake = null;        // ends the wait between polls early (a key was entered)
const speeds = [];      // tok/s of recent answers, for the sparkline

function showProblem(message) {
  const banner = $("problem");
  banner.hidden = !message;
  banner.textContent = message ?? "";
}

function renderSummary(state, health, view) {
  const nodes = Object.keys(state.nodes ?? {}).length;
  const instances = Object.keys(state.instances ?? {}).length;
  const master = state.masterId ? view.labels.get(state.masterId) ?? shortId(state.masterId) : "electing…";
  $("summary").replaceChildren(
    h("span", {}, h("strong", {}, nodes), ` node${nodes === 1 ? "" : "s"}`),
    h("span", {}, h("strong", {}, instances), ` instance${instances === 1 ? "" : "s"}`),
    h("span", {}, "master ", h("strong", { class: "master-name" }, `★ ${master}`)),
    h("span", {}, `term ${state.term ?? "–"}`),
    health ? h("span", {}, `this node: `, h("span", { class: ["chip", tone(health.status)] },
      h("span", { class: "chip-dot", "aria-hidden": "true" }), health.status),
      ` · queue ${health.queue_depth ?? 0}${health.busy ? " · generating" : ""}`) : null,
    health?.version ? h("span", { class: "muted" }, `v${health.version}`) : null);
}

function setLive(kind, text) {
  const pill = $("live");
  pill.className = `live ${kind}`;
  pill.lastElementChild.textContent = text;
}

/** The throughput readout: the answer being streamed, else the last one, and a sparkline of recent answers. */
function showSpeed(meter, done) {
  $("speed-title").textContent = done ? "Last answer" : "Streaming";
  $("tps").classList.toggle("none", meter.tps === null);
  $("tps").textContent = meter.tps === null ? "–" : meter.tps.toFixed(1);
  $("ttft").textContent = meter.ttft === null ? "–" : seconds(meter.ttft);
  $("tokens").textContent = String(meter.tokens);
  $("speed").classList.toggle("streaming", !done);
  if (!done || meter.tps === null) return;
  speeds.push(meter.tps);
  if (speeds.length > 24) speeds.shift();
  const top = Math.max(...speeds);
  const w = 6;
  $("recent").hidden = speeds.length < 2;
  $("sparkline").replaceChildren(...speeds.map((v, i) => {
    const bar = Math.max(2, (30 * v) / top);
    return s("rect", { x: i * (w + 2), y: 32 - bar, width: w, height: bar, rx: 1.5 }, s("title", {}, `${v.toFixed(1)} tok/s`));
  }));
}

async function refreshModels(state, chat, placer, view) {
  if (performance.now() - modelsAt > MODELS_EVERY_MS || !models.length) {
    models = (await getJSON("/v1/models")).data ?? [];
    modelsAt = performance.now();
  }
  chat.setModels(models, new Set(Object.values(state.instances ?? {}).map((i) => i.modelId)));
  placer.update(view, models);
}

async function poll(chat, placer) {
  try {
    const [state, health] = await Promise.all([
      getJSON("/state").then(untagInstances),
      getJSON("/health", [503]).catch(() => null),  // 503 says why: stalled, draining, stopping
    ]);
    const view = { state, colors: nodeColors(Object.keys(state.nodes ?? {})), labels: nodeLabels(state.nodes ?? {}) };
    renderSummary(state, health, view);
    renderTopology($("topology"), view);
    renderInstances($("instances"), view);
    renderTasks($("tasks"), view);
    renderExtras($("extras-section"), $("extras"), state);
    await refreshModels(state, chat, placer, view).catch(() => {});
    lastGood = performance.now();
    showProblem(null);
    setLive("ok", "live");
    document.body.classList.remove("stale");
    return true;
  } catch (e) {
    document.body.classList.toggle("stale", lastGood > 0);
    if (e.status === 401) {  // the key form says why; polling waits for a key
      showProblem(null);
      setLive("bad", "locked");
      return false;
    }
    const since = lastGood ? ` The view below is ${seconds((performance.now() - lastGood) / 1000)} old.` : "";
    const reason = e.status ? e.message : "this node does not answer (stopped, or the network is down)";
    showProblem(`Cannot read the cluster state: ${reason}. Retrying every second.${since}`);
    setLive("bad", "offline");
    return true;
  }
}

async function main() {
  const chat = new Chat(showSpeed);
  const placer = new Placer(() => wake?.());
  setupKeyForm(() => wake?.());
  watchTopologySize($("topology"));
  for (;;) {
    const started = performance.now();
    const unlocked = await poll(chat, placer);
    const pause = unlocked ? Math.max(100, POLL_MS - (performance.now() - started)) * (document.hidden ? 5 : 1)
      : LOCKED_POLL_MS;
    await new Promise((resolve) => { wake = resolve; setTimeout(resolve, pause); });
  }
}

main();
