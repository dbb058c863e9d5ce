// Small helpers shared by the dashboard's views: an element builder that only ever sets text (node
// names and model output come from the network, so nothing is parsed as HTML), and formatters.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(element, attrs, children) {
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") element.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "style" && typeof value === "object") {
      for (const [name, v] of Object.entries(value)) {
        if (v === undefined || v === null) continue;
        if (name.startsWith("--")) element.style.setProperty(name, v);
        else element.style[name] = v;
      }
    }
    else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else element.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

/** h("div", {class: "x"}, "text", child, [more]) */
export const h = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);

/** The same for SVG elements. */
export const s = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

export const $ = (id) => document.getElementById(id);

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

export function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "?";
  let i = 0;
  while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${UNITS[i]}`;
}

export function seconds(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return "–";
  if (x < 1) return `${Math.round(x * 1000)} ms`;
  if (x < 90) return `${x.toFixed(1)} s`;
  return `${Math.round(x / 60)} min`;
}

export const shortId = (id) => String(id ?? "").slice(0, 8);

/** Renders any JSON value compactly, for fields this page does not know yet. */
export function plain(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

// Node colours: distinct hues that stay readable on the dark background, assigned by sorted node id so
// every node of the cluster paints the same node the same colour.
const PALETTE = ["#5eb1ff", "#f7a24b", "#5fd39a", "#d68cff", "#ff7a8a", "#e8d45c", "#4fd6d6", "#b6a3ff"];

export function nodeColors(nodeIds) {
  const sorted = [...nodeIds].sort();
  return new Map(sorted.map((id, i) => [id, PALETTE[i % PALETTE.length]]));
}

/** A status word's CSS class: good, busy, bad or idle. */
export function tone(status) {
  switch (status) {
    case "Ready": case "Complete": case "ok": return "good";
    case "Running": case "Loading": case "Loaded": case "WarmingUp": case "Connecting": case "Connected":
    case "Pending": case "ShuttingDown": case "draining": case "stopping": return "busy";
    case "Failed": case "stalled": return "bad";
    default: return "idle";
  }
}

/** Makes `container`'s children `next`, keeping each old child that renders the same, so hover, focus and
 * text selection survive the once-a-second refresh. */
export function patch(container, next) {
  next.forEach((element, i) => {
    const current = container.children[i];
    if (current?.outerHTML === element.outerHTML) return;
    if (current) current.replaceWith(element);
    else container.append(element);
  });
  while (container.children.length > next.length) container.lastElementChild.remove();
}
