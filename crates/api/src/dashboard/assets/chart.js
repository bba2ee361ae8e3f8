// Time-series line charts drawn as inline SVG: a rolling window of {t, v} points.
"use strict";
window.Chart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 300, H = 100, PAD = 4;

  function node(name, attrs) {
    const n = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    return n;
  }

  // A "nice" ceiling (1, 2 or 5 times a power of ten) so the axis reads well.
  function ceiling(max) {
    if (!(max > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(max)));
    return [1, 2, 5, 10].map((m) => m * p).find((c) => c >= max);
  }

  // Draws `points` over the last `windowMs` ending at `now`; `format` labels the axis top.
  function draw(svg, points, now, windowMs, format) {
    const top = ceiling(Math.max(0, ...points.map((p) => p.v)));
    const x = (t) => ((t - (now - windowMs)) / windowMs) * W;
    const y = (v) => H - PAD - (v / top) * (H - 2 * PAD);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.replaceChildren();
    for (const f of [0, 0.5, 1]) {
      svg.append(node("line", { x1: 0, x2: W, y1: y(top * f), y2: y(top * f), class: "grid" }));
    }
    const coords = points.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
    if (points.length > 1) {
      const first = x(points[0].t).toFixed(1), last = x(points[points.length - 1].t).toFixed(1);
      svg.append(node("polygon", { points: `${first},${H - PAD} ${coords} ${last},${H - PAD}`, class: "area" }));
    }
    svg.append(node("polyline", { points: coords, class: "line", "vector-effect": "non-scaling-stroke" }));
    const label = svg.parentElement.querySelector(".axis") || svg.parentElement.appendChild(document.createElement("div"));
    label.className = "axis";
    label.textContent = `top ${format(top)} · last ${Math.round(windowMs / 1000)} s`;
    // Read by the browser test and handy in devtools.
    svg.dataset.points = String(points.length);
    svg.dataset.last = points.length ? String(points[points.length - 1].v) : "";
    svg.dataset.max = String(Math.max(0, ...points.map((p) => p.v)));
  }

  return { draw };
})();
