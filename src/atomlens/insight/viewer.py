"""An interactive 3D view of molecules with per-atom values, as one self-contained HTML file.

Open the file in any browser, offline: the data and a small canvas viewer are inlined, no
script is fetched from the internet. Drag to rotate, wheel to zoom, hover over an atom for
its element, index and values; the menu picks the per-atom property that colours the atoms
(diverging map centred on zero, as in the PNG figures) and the arrows step through the
structures.

(py3Dmol and chemiscope were considered: both load their JavaScript from the web when the
file is viewed, and chemiscope's offline bundle is a 3 MB internal asset of its Sphinx
extension; a molecule of a hundred atoms needs neither.)
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ..fileio import atomic_file


def viewer_data(
    frames, properties: list[dict[str, tuple[np.ndarray, str]]], titles: list[str] | None = None
) -> list[dict]:
    """The JSON-ready structures: symbols, positions (Angstrom), radii, bonds, properties.

    ``properties[k]`` maps a name to ``(values (n_atoms,), unit)`` for structure ``k``.
    """
    from ase.data import chemical_symbols, covalent_radii
    from ase.data.colors import jmol_colors

    from .rings import bond_graph

    data = []
    for k, atoms in enumerate(frames):
        numbers = np.asarray(atoms.numbers)
        props = {}
        for name, (values, unit) in properties[k].items():
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            if values.shape[0] != len(numbers):
                raise ValueError(
                    f"property {name!r} of structure {k} has {values.shape[0]} "
                    f"values for {len(numbers)} atoms"
                )
            # decimals shown: meV are integers in practice, anything else gets 4
            props[name] = {
                "values": [round(float(v), 6) for v in values],
                "unit": unit,
                "digits": 0 if unit == "meV" else 4,
            }
        data.append(
            {
                "title": titles[k] if titles else atoms.get_chemical_formula(),
                "symbols": [chemical_symbols[z] for z in numbers],
                "positions": np.round(atoms.positions - atoms.positions.mean(0), 4).tolist(),
                "radii": [round(float(covalent_radii[z]), 3) for z in numbers],
                "colors": [
                    "#" + "".join(f"{int(255 * c):02x}" for c in jmol_colors[z]) for z in numbers
                ],
                "bonds": [[int(i), int(j)] for i, j in bond_graph(numbers, atoms.positions)],
                "properties": props,
            }
        )
    return data


def write_viewer(
    path: str | Path,
    frames,
    properties: list[dict[str, tuple[np.ndarray, str]]],
    title: str = "atomlens",
    titles: list[str] | None = None,
) -> Path:
    """Write the HTML view of ``frames`` with per-atom ``properties`` (see :func:`viewer_data`)."""
    if not isinstance(frames, (list, tuple)):
        frames = [frames]
    payload = json.dumps(viewer_data(frames, properties, titles), separators=(",", ":"))
    # a "</script>" inside the data would end the script element early
    payload = payload.replace("</", "<\\/")
    page = TEMPLATE.replace("@TITLE@", html.escape(title)).replace("@DATA@", payload)
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>@TITLE@</title>
<style>
body{font-family:sans-serif;margin:8px;color:#222}
#bar{display:flex;gap:8px;align-items:center;flex-wrap:wrap;font-size:14px}
canvas{border:1px solid #ccc;cursor:grab;touch-action:none}
#tip{position:absolute;background:#fff;border:1px solid #888;padding:3px 6px;font-size:12px;
pointer-events:none;display:none;white-space:pre}
#scale{height:12px;width:220px;background:linear-gradient(to right,#2166ac,#f7f7f7,#b2182b)}
</style></head><body>
<div id="bar"><b>@TITLE@</b>
<button id="prev">&#9664;</button><span id="name"></span><button id="next">&#9654;</button>
colour by <select id="prop"></select>
<span id="lo"></span><span id="scale"></span><span id="hi"></span></div>
<canvas id="view" width="720" height="540"></canvas><div id="tip"></div>
<p style="font-size:12px">Drag: rotate. Wheel: zoom. Hover: atom values. Colours: blue negative,
white zero, red positive (each side scaled to its largest value).</p>
<script>
const DATA = @DATA@;
const cv = document.getElementById("view"), ctx = cv.getContext("2d");
const sel = document.getElementById("prop"), tip = document.getElementById("tip");
let k = 0, rot = [[1,0,0],[0,1,0],[0,0,1]], zoom = 1, drag = null, screen = [];
function mul(a, b) { return a.map(r => [0,1,2].map(j => r[0]*b[0][j] + r[1]*b[1][j] + r[2]*b[2][j])); }
function turn(ax, ay) {
  const cx = Math.cos(ax), sx = Math.sin(ax), cy = Math.cos(ay), sy = Math.sin(ay);
  rot = mul(mul([[1,0,0],[0,cx,-sx],[0,sx,cx]], [[cy,0,sy],[0,1,0],[-sy,0,cy]]), rot);
}
function mix(a, b, t) { return a.map((v, i) => Math.round(v + (b[i] - v) * t)); }
function colour(v, lo, hi) {
  const blue = [33,102,172], white = [247,247,247], red = [178,24,43];
  const c = v < 0 ? mix(white, blue, lo < 0 ? v / lo : 0) : mix(white, red, hi > 0 ? v / hi : 0);
  return "rgb(" + c.join(",") + ")";
}
function fmt(x, p) { return x.toFixed(p.digits); }
function setup() {
  const m = DATA[k], names = Object.keys(m.properties), old = sel.value;
  sel.innerHTML = "<option>element</option>" + names.map(n => "<option>" + n + "</option>").join("");
  sel.value = names.includes(old) ? old : (names[0] || "element");
  document.getElementById("name").textContent = (k + 1) + "/" + DATA.length + " " + m.title;
  draw();
}
function draw() {
  const m = DATA[k], p = m.properties[sel.value];
  const lo = p ? Math.min(0, ...p.values) : 0, hi = p ? Math.max(0, ...p.values) : 0;
  document.getElementById("lo").textContent = p ? fmt(lo, p) + " " + p.unit : "";
  document.getElementById("hi").textContent = p ? fmt(hi, p) + " " + p.unit : "";
  document.getElementById("scale").style.display = p ? "" : "none";
  const extent = Math.max(2, ...m.positions.map(r => Math.hypot(...r))) + 1;
  const s = zoom * Math.min(cv.width, cv.height) / (2 * extent);
  screen = m.positions.map((r, i) => {
    const q = rot.map(row => row[0]*r[0] + row[1]*r[1] + row[2]*r[2]);
    return {i: i, x: cv.width / 2 + s * q[0], y: cv.height / 2 - s * q[1], z: q[2],
            r: s * (0.25 + 0.35 * m.radii[i])};
  });
  ctx.clearRect(0, 0, cv.width, cv.height);
  ctx.strokeStyle = "#555"; ctx.lineWidth = 3;
  for (const [i, j] of m.bonds) {
    ctx.beginPath(); ctx.moveTo(screen[i].x, screen[i].y); ctx.lineTo(screen[j].x, screen[j].y);
    ctx.stroke();
  }
  for (const a of [...screen].sort((u, v) => u.z - v.z)) {
    const g = ctx.createRadialGradient(a.x - a.r / 3, a.y - a.r / 3, a.r / 8, a.x, a.y, a.r);
    g.addColorStop(0, "#fff");
    g.addColorStop(0.35, p ? colour(p.values[a.i], lo, hi) : m.colors[a.i]);
    g.addColorStop(1, "#333");
    ctx.beginPath(); ctx.arc(a.x, a.y, a.r, 0, 2 * Math.PI); ctx.fillStyle = g; ctx.fill();
    ctx.fillStyle = "#000"; ctx.font = Math.max(9, a.r * 0.7) + "px sans-serif";
    ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.fillText(m.symbols[a.i], a.x, a.y);
  }
}
cv.onpointerdown = e => { drag = [e.clientX, e.clientY]; cv.setPointerCapture(e.pointerId); };
cv.onpointerup = () => { drag = null; };
cv.onpointermove = e => {
  if (drag) {
    turn((e.clientY - drag[1]) * 0.01, (e.clientX - drag[0]) * 0.01);
    drag = [e.clientX, e.clientY]; draw(); return;
  }
  const b = cv.getBoundingClientRect(), x = e.clientX - b.left, y = e.clientY - b.top;
  const hit = [...screen].sort((u, v) => v.z - u.z).find(a => Math.hypot(a.x - x, a.y - y) < a.r);
  if (!hit) { tip.style.display = "none"; return; }
  const m = DATA[k];
  tip.textContent = m.symbols[hit.i] + " " + hit.i + Object.entries(m.properties).map(
    ([n, p]) => "\\n" + n + ": " + fmt(p.values[hit.i], p) + " " + p.unit).join("");
  tip.style.left = (e.pageX + 12) + "px"; tip.style.top = (e.pageY + 12) + "px";
  tip.style.display = "block";
};
cv.onwheel = e => { e.preventDefault(); zoom *= e.deltaY < 0 ? 1.1 : 1 / 1.1; draw(); };
sel.onchange = draw;
document.getElementById("prev").onclick = () => { k = (k + DATA.length - 1) % DATA.length; setup(); };
document.getElementById("next").onclick = () => { k = (k + 1) % DATA.length; setup(); };
setup();
</script></body></html>
"""
