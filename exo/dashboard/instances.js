// Each placed model as a bar of its layers split into the shards of its nodes, its runners' states, the
// latest tasks, and whatever else the cluster state carries that this page does not know yet.

import { h, patch, plain, shortId, tone } from "./dom.js";

// `mode` is this node's own (its card shows it), `queues` the requests waiting per instance (each instance shows its own)
const KNOWN_STATE = new Set(["lastEventIndex", "term", "masterId", "nodes", "instances", "runners", "tasks",
  "nodeId", "isMaster", "peers", "mode", "queues"]);

/** The state with each instance's body, its kind in `kind`: /state tags them as exo's upstream does,
 * `{"CpuRingInstance": {...}}`. */
export function untagInstances(state) {
  const instances = Object.entries(state.instances ?? {}).map(([id, tagged]) => {
    const [[kind, body]] = Object.entries(tagged);
    return [id, { ...body, kind }];
  });
  return { ...state, instances: Object.fromEntries(instances) };
}

/** The layer bar: one segment per shard, in layer order, and hatched gaps where no shard holds a layer. */
function layerBar(instance, view) {
  const n = instance.nLayers || Math.max(0, ...instance.shards.map((s) => s.end));
  const shards = [...instance.shards].sort((a, b) => a.start - b.start);
  const parts = [];
  let at = 0;
  for (const shard of shards) {
    if (shard.start > at) parts.push({ start: at, end: shard.start });
    parts.push({ ...shard, start: Math.max(shard.start, at) });
    at = Math.max(at, shard.end);
  }
  if (at < n) parts.push({ start: at, end: n });
  const describe = shards.map((s) => `layers ${s.start}–${s.end} on ${view.labels.get(s.nodeId) ?? s.nodeId}`);
  return [
    h("div", { class: "layers", role: "img", "aria-label": `${n} layers: ${describe.join(", ")}` },
      parts.map((p) => p.nodeId === undefined
        ? h("div", { class: "shard gap", style: { flexGrow: p.end - p.start }, title: `layers ${p.start}–${p.end}: no shard` })
        : h("div", { class: "shard", "data-node-id": p.nodeId, "data-rank": p.rank,
                     style: { flexGrow: Math.max(p.end - p.start, 0.5), "--node": view.colors.get(p.nodeId) ?? "#888" },
                     title: `rank ${p.rank}: layers ${p.start}–${p.end} on ${view.labels.get(p.nodeId) ?? p.nodeId}` },
            h("span", { class: "shard-node" }, view.labels.get(p.nodeId) ?? shortId(p.nodeId)),
            h("span", { class: "shard-range" }, `${p.start}–${p.end}`)))),
    h("div", { class: "scale", "aria-hidden": "true" },
      [...new Set([0, ...shards.flatMap((s) => [s.start, s.end]), n])].sort((a, b) => a - b).map((x) =>
        h("span", { style: { left: `${n ? (100 * x) / n : 0}%` } }, x))),
  ];
}

// A runner whose layers still come from a node that has the model's files: how far, and from where.
function fetching(runner, view) {
  const d = runner.download;
  if (!d || d.bytesDone >= d.bytesTotal) return null;
  const from = view.labels.get(d.fromNode) ?? shortId(d.fromNode);
  const percent = Math.floor((100 * d.bytesDone) / Math.max(d.bytesTotal, 1));
  return h("span", { class: "muted", "data-download": percent },
    ` · fetching ${percent}% of ${Math.ceil(d.bytesTotal / 1e6)} MB from ${from}`);
}

function runnerList(instance, view) {
  const runners = Object.entries(view.state.runners ?? {})
    .filter(([, r]) => r.instanceId === instance.instanceId).sort(([, a], [, b]) => a.rank - b.rank);
  if (!runners.length) return h("p", { class: "muted small" }, "no runners yet");
  return h("ul", { class: "chips runners" }, runners.map(([rid, r]) =>
    h("li", { class: ["chip", tone(r.status)], "data-runner-id": rid, style: { "--node": view.colors.get(r.nodeId) } },
      h("span", { class: "chip-dot", "aria-hidden": "true" }),
      h("span", {}, `rank ${r.rank} · ${view.labels.get(r.nodeId) ?? shortId(r.nodeId)} · `),
      h("strong", {}, r.status),
      r.batch ? h("span", { class: "batch", title: "chats it decodes together now" }, ` · batch ${plain(r.batch)}`) : null,
      r.restarts ? h("span", { class: "muted" }, ` · ${r.restarts} restart${r.restarts > 1 ? "s" : ""}`) : null,
      fetching(r, view),
      r.error ? h("span", { class: "chip-error" }, ` — ${r.error}`) : null)));
}

function overall(instance, view) {
  const statuses = Object.values(view.state.runners ?? {})
    .filter((r) => r.instanceId === instance.instanceId).map((r) => r.status);
  if (!statuses.length) return "Pending";
  for (const status of ["Failed", "Running", "Loading", "WarmingUp", "Connecting", "Idle"]) {
    if (statuses.includes(status)) return status;
  }
  return statuses.every((x) => x === "Ready") && statuses.length === instance.shards.length ? "Ready" : statuses[0];
}

export function renderInstances(container, view) {
  const instances = Object.values(view.state.instances ?? {});
  if (!instances.length) {
    patch(container, [h("p", { class: "empty" }, "No model placed yet: the first chat request places one.")]);
    return;
  }
  patch(container, instances.map((instance) => {
    const status = overall(instance, view);
    const nodes = new Set(instance.shards.map((s) => s.nodeId));
    const queued = view.state.queues?.[instance.instanceId];
    return h("article", { class: "instance", "data-instance-id": instance.instanceId },
      h("header", {},
        h("h3", {}, instance.modelId),
        h("span", { class: ["chip", tone(status)] }, h("span", { class: "chip-dot", "aria-hidden": "true" }), status),
        h("span", { class: "muted small" },
          `${instance.nLayers} layers · ${nodes.size} node${nodes.size === 1 ? "" : "s"} · `,
          instance.context ? h("span", { class: "context", title: "positions a request may use, prompt and completion" },
            `context ${plain(instance.context)} · `) : null,
          queued !== undefined ? `queue ${plain(queued)} · ` : null,
          h("code", { title: "instance id" }, instance.instanceId)),
        h("button", { type: "button", class: "quiet delete", "data-delete": instance.instanceId,
                      title: "stop its runners and remove it" }, "Delete")),
      layerBar(instance, view),
      runnerList(instance, view));
  }));
}

export function renderTasks(container, view) {
  const tasks = Object.values(view.state.tasks ?? {}).reverse().slice(0, 12);
  if (!tasks.length) {
    patch(container, [h("p", { class: "empty" }, "No tasks yet.")]);
    return;
  }
  const rows = tasks.map((t) => {
    const runner = view.state.runners?.[`${t.instanceId}.${t.rank}`];
    const model = view.state.instances?.[t.instanceId]?.modelId ?? t.instanceId;
    return h("tr", { "data-task-id": t.taskId },
      h("td", {}, t.kind),
      h("td", {}, h("span", { class: ["chip", tone(t.status)] }, h("span", { class: "chip-dot", "aria-hidden": "true" }), t.status)),
      h("td", {}, model, h("span", { class: "muted" }, ` · rank ${t.rank}`)),
      h("td", {}, runner ? view.labels.get(runner.nodeId) ?? shortId(runner.nodeId) : "–"),
      h("td", { class: "mono muted" }, t.taskId),
      h("td", { class: "task-error" }, t.error ?? ""));
  });
  patch(container, [h("table", { class: "tasks" },
    h("thead", {}, h("tr", {}, ["kind", "status", "model", "node", "task", ""].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows))]);
}

/** Parts of the state this page has no view for yet (queues, say): shown as they are rather than hidden. */
export function renderExtras(section, container, state) {
  const extras = Object.entries(state).filter(([key]) => !KNOWN_STATE.has(key));
  section.hidden = !extras.length;
  patch(container, extras.map(([key, value]) => h("div", { class: "extra", "data-key": key },
    h("h3", {}, key.replaceAll("_", " ")),
    value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length
      ? h("dl", { class: "facts" }, Object.entries(value).map(([k, v]) => [h("dt", {}, k), h("dd", {}, plain(v))]))
      : h("p", { class: "mono" }, plain(value)))));
}
