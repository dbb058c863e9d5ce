// The cluster's nodes as cards, with the links between them drawn in an SVG layer underneath: the heartbeat
// links this node hears (labelled with how long ago it heard each peer) and each instance's ring of ranks.

import { bytes, h, patch, plain, s, seconds, shortId, tone } from "./dom.js";

const KNOWN = new Set(["nodeId", "hostname", "version", "address", "apiPort", "memoryTotal", "memoryAvailable",
  "memoryCap", "cpuCount", "accelerator", "mlxDevice", "mode"]);
const QUIET_SECONDS = 1.5;  // a peer unheard this long is drawn as a fading link (nodes drop peers after ~3 s)
const RING_COLORS = ["#c3cbff", "#ffc9e4", "#b9f3d0", "#ffe3b0"];
const lastViews = new WeakMap();  // topology element -> what it shows, to redraw the links on resize

/** A label that tells nodes apart: their hostname, with the id's start when two share a hostname. */
export function nodeLabels(nodes) {
  const counts = new Map();
  for (const n of Object.values(nodes)) counts.set(n.hostname, (counts.get(n.hostname) ?? 0) + 1);
  return new Map(Object.entries(nodes).map(([id, n]) =>
    [id, counts.get(n.hostname) > 1 || !n.hostname ? `${n.hostname || "node"} · ${shortId(id)}` : n.hostname]));
}

function modeBadges(node) {
  const badges = [];
  if (node.mode && node.mode !== "normal") badges.push(h("span", { class: "badge warn" }, String(node.mode)));
  if (node.maintenance) badges.push(h("span", { class: "badge warn" }, "maintenance"));
  return badges;
}

function reachBadge(id, view) {
  if (id === view.state.nodeId) return h("span", { class: "badge self", title: "the node serving this page" }, "this node");
  const peer = view.state.peers?.[id];
  if (!peer) return h("span", { class: "badge bad", title: "this node hears no heartbeat from it" }, "not heard");
  if (peer.secondsSinceHeartbeat > QUIET_SECONDS) {
    return h("span", { class: "badge warn" }, `quiet ${seconds(peer.secondsSinceHeartbeat)}`);
  }
  return null;
}

function memoryMeter(node) {
  const total = node.memoryTotal || 0;
  const used = Math.max(0, total - (node.memoryAvailable ?? 0));
  const pct = (x) => `${total ? Math.min(100, (100 * x) / total).toFixed(1) : 0}%`;
  const cap = node.memoryCap;
  return [
    h("div", { class: "meter", role: "meter", "aria-label": "memory in use", "aria-valuemin": 0,
               "aria-valuemax": total, "aria-valuenow": used, "aria-valuetext": `${bytes(used)} of ${bytes(total)}` },
      h("div", { class: "meter-fill", style: { width: pct(used) } }),
      cap ? h("div", { class: "meter-cap", style: { left: pct(Math.min(cap, total)) }, title: `exo may use ${bytes(cap)}` })
          : null),
    h("div", { class: "meter-label" },
      h("span", {}, `${bytes(used)} / ${bytes(total)} used`),
      h("span", {}, cap ? `cap ${bytes(cap)}` : `${bytes(node.memoryAvailable)} free`)),
  ];
}

function runnerRows(id, view) {
  const runners = Object.entries(view.state.runners ?? {}).filter(([, r]) => r.nodeId === id);
  if (!runners.length) return h("p", { class: "muted small" }, "no runners");
  return h("ul", { class: "node-runners", "aria-label": "runners" }, runners.map(([rid, r]) => {
    const model = view.state.instances?.[r.instanceId]?.modelId ?? r.instanceId;
    return h("li", { class: tone(r.status), title: r.error ?? `runner ${rid}, pid ${r.pid ?? "–"}` },
      h("span", { class: "chip-dot", "aria-hidden": "true" }),
      h("span", { class: "runner-model" }, model),
      h("span", { class: "mono muted" }, `${r.start}–${r.end}`),
      h("span", { class: "runner-status" }, r.status));
  }));
}

function nodeCard(id, node, view) {
  const master = id === view.state.masterId;
  const extras = Object.entries(node).filter(([key, value]) => !KNOWN.has(key) && value !== null && value !== undefined);
  const device = [node.accelerator, node.cpuCount ? `${node.cpuCount} cores` : null].filter(Boolean).join(" · ");
  const url = node.address && node.apiPort ? `http://${node.address.includes(":") ? `[${node.address}]` : node.address}:${node.apiPort}/` : null;
  const away = (node.mode && node.mode !== "normal") || node.maintenance;
  return h("article", { class: ["node-card", master && "master", away && "away"], "data-node-id": id,
                        style: { "--node": view.colors.get(id) }, "aria-label": `node ${view.labels.get(id)}` },
    h("header", {},
      h("span", { class: "node-dot", "aria-hidden": "true" }),
      h("h3", {}, node.hostname || "node"),
      master ? h("span", { class: "badge master", title: `master of term ${view.state.term}` }, "★ master") : null),
    h("div", { class: "node-sub" },
      h("code", { class: "node-id", title: id }, shortId(id)),
      reachBadge(id, view), modeBadges(node)),
    h("dl", { class: "facts" },
      h("dt", {}, "device"), h("dd", { title: node.mlxDevice ?? "" }, device || "–"),
      h("dt", {}, "api"), h("dd", {}, url ? h("a", { href: url }, `${node.address}:${node.apiPort}`) : "–"),
      h("dt", {}, "version"), h("dd", {}, node.version ?? "–"),
      extras.map(([key, value]) => [h("dt", {}, key.replaceAll("_", " ")), h("dd", {}, plain(value))])),
    memoryMeter(node),
    runnerRows(id, view));
}

export function renderTopology(root, view) {
  const ids = Object.keys(view.state.nodes ?? {}).sort((a, b) =>
    (b === view.state.masterId) - (a === view.state.masterId) || a.localeCompare(b));
  const cards = root.querySelector(".node-cards");
  if (!ids.length) patch(cards, [h("p", { class: "empty" }, "No nodes in the cluster state yet.")]);
  else patch(cards, ids.map((id) => nodeCard(id, view.state.nodes[id], view)));
  lastViews.set(root, view);
  requestAnimationFrame(() => drawLinks(root));
}

// Geometry of the links, in the container's pixels.

function boxOf(root, id) {
  const card = root.querySelector(`.node-card[data-node-id="${CSS.escape(id)}"]`);
  if (!card) return null;
  const outer = root.getBoundingClientRect();
  const r = card.getBoundingClientRect();
  return { x: r.left - outer.left, y: r.top - outer.top, w: r.width, h: r.height };
}

/** Where the line from the box's centre toward `to` leaves the box. */
function exit(box, to, pad = 6) {
  const c = { x: box.x + box.w / 2, y: box.y + box.h / 2 };
  const dx = to.x - c.x;
  const dy = to.y - c.y;
  const k = Math.min(dx ? (box.w / 2 + pad) / Math.abs(dx) : Infinity, dy ? (box.h / 2 + pad) / Math.abs(dy) : Infinity);
  return { x: c.x + dx * k, y: c.y + dy * k };
}

const centre = (b) => ({ x: b.x + b.w / 2, y: b.y + b.h / 2 });

/** Endpoints of a link between two boxes, both moved sideways by `offset` (so several links can sit side by side). */
function ends(a, b, offset) {
  const ca = centre(a);
  const cb = centre(b);
  const len = Math.hypot(cb.x - ca.x, cb.y - ca.y) || 1;
  const n = { x: -(cb.y - ca.y) / len, y: (cb.x - ca.x) / len };
  const shift = (p) => ({ x: p.x + n.x * offset, y: p.y + n.y * offset });
  return { from: exit(a, shift(cb)), to: exit(b, shift(ca)), n };
}

function drawLinks(root) {
  const view = lastViews.get(root);
  const svg = root.querySelector("svg.links");
  if (!view || !svg) return;
  const layer = [];
  const self = view.state.nodeId;
  const selfBox = boxOf(root, self);
  for (const [peer, info] of Object.entries(view.state.peers ?? {})) {
    const box = boxOf(root, peer);
    if (!selfBox || !box) continue;
    const { from, to } = ends(selfBox, box, 0);
    const quiet = info.secondsSinceHeartbeat > QUIET_SECONDS;
    const mid = { x: (from.x + to.x) / 2, y: (from.y + to.y) / 2 };
    const label = `♥ ${seconds(info.secondsSinceHeartbeat)}`;
    const width = label.length * 6.5 + 12;
    layer.push(s("line", { class: ["link", quiet && "quiet"], x1: from.x, y1: from.y, x2: to.x, y2: to.y }),
      s("rect", { class: ["link-label-bg", quiet && "quiet"], x: mid.x - width / 2, y: mid.y - 9, width, height: 18, rx: 9 }),
      s("text", { class: "link-label", x: mid.x, y: mid.y + 4, "text-anchor": "middle" }, label,
        s("title", {}, `this node last heard ${view.labels.get(peer) ?? peer} ${seconds(info.secondsSinceHeartbeat)} ago`)));
  }
  Object.values(view.state.instances ?? {}).forEach((instance, i) => {
    const shards = [...(instance.shards ?? [])].sort((a, b) => a.rank - b.rank);
    if (shards.length < 2) return;
    const running = Object.values(view.state.runners ?? {})
      .some((r) => r.instanceId === instance.instanceId && r.status === "Running");
    const color = RING_COLORS[i % RING_COLORS.length];
    shards.forEach((shard, k) => {
      const next = shards[(k + 1) % shards.length];
      const a = boxOf(root, shard.nodeId);
      const b = boxOf(root, next.nodeId);
      if (!a || !b || shard.nodeId === next.nodeId) return;
      const bend = 26 + 14 * i;
      const { from, to, n } = ends(a, b, bend * 0.6);
      const c = { x: (from.x + to.x) / 2 + n.x * bend, y: (from.y + to.y) / 2 + n.y * bend };
      layer.push(s("path", { class: ["ring", running && "flowing"], d: `M${from.x},${from.y} Q${c.x},${c.y} ${to.x},${to.y}`,
                              stroke: color, "marker-end": `url(#arrow-${i % RING_COLORS.length})` },
        s("title", {}, `${instance.modelId}: rank ${shard.rank} → rank ${next.rank}`)));
    });
  });
  const defs = s("defs", {}, RING_COLORS.map((color, i) =>
    s("marker", { id: `arrow-${i}`, viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 7, markerHeight: 7,
                  orient: "auto" }, s("path", { d: "M0,0 L10,5 L0,10 z", fill: color }))));
  svg.replaceChildren(defs, ...layer);
}

export function watchTopologySize(root) {
  new ResizeObserver(() => drawLinks(root)).observe(root);
}
