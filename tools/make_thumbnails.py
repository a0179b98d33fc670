"""Draws the template thumbnail of every example workflow: workflows/NAME.json -> workflows/NAME.jpg.

    python tools/make_thumbnails.py [--check]

ComfyUI lists a custom node pack's `workflows/*.json` among its templates and asks for `NAME.jpg` beside each
one as the template's picture. The picture is a diagram of the workflow as it is laid out: its nodes where they
sit, with their titles, and its links coloured by type, under the workflow's heading (the first line of its
note). Run it after changing a workflow: it draws the thumbnails whose workflow changed. `--check` only says
whether each thumbnail was drawn from its workflow as it is (tests/test_workflows_layout.py checks the same):
every JPEG carries, as its comment, a fingerprint of what it was drawn from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from io import BytesIO
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SIZE = 512  # square, as the template browser shows them
HEADER = 72
PAD = 18
TITLE_BAR = 30  # LiteGraph's node title height, above a node's pos
NOTE_TYPES = {"Note", "MarkdownNote"}
CORE_TITLES = {"ImageBatch": "Batch Images"}  # core nodes the examples use, by their display name
BACKGROUND = (30, 30, 30)
GRID = (40, 40, 40)
NODE_BODY = (53, 53, 53)
NODE_OUTLINE = (90, 90, 90)
TITLE_OURS = (52, 84, 120)
TITLE_CORE = (74, 74, 74)
TEXT = (235, 235, 235)
ACCENT = (120, 190, 255)
LINK_COLOURS = {  # by socket type; the rest in the editor's default link colour
    "IMAGE": (100, 181, 246),
    "AUDIO": (234, 128, 252),
    "FLOAT": (170, 238, 136),
    "INFVSR_MODEL": (179, 157, 219),
    "INFVSR_GUIDANCE": (255, 183, 77),
    "INFVSR_CACHE": (77, 182, 172),
    "INFVSR_STREAM": (240, 98, 146),
}
DEFAULT_LINK = (153, 170, 153)
JPEG_QUALITY = 90
DRAWING = 1  # the drawing's version: raise it when render() changes, so that every thumbnail is drawn again


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def display_names() -> dict[str, str]:
    """The titles the editor shows: the pack's display names, and those of the core nodes the examples use."""
    sys.path.insert(0, str(ROOT))
    try:
        from nodes import NODE_DISPLAY_NAME_MAPPINGS
    finally:
        sys.path.remove(str(ROOT))
    return {**CORE_TITLES, **NODE_DISPLAY_NAME_MAPPINGS}


def heading(workflow: dict) -> str:
    """The workflow's heading: the first Markdown heading of its note, else the note's title."""
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES:
            for line in str((node.get("widgets_values") or [""])[0]).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
            if node.get("title"):
                return node["title"]
    return ""


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if not line or draw.textlength(candidate, font=font) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def _bezier(start: tuple[float, float], end: tuple[float, float], steps: int = 32) -> list[tuple[float, float]]:
    """The editor's spline link: leaves the output and enters the input horizontally."""
    (x0, y0), (x3, y3) = start, end
    bend = max(20.0, abs(x3 - x0) * 0.4)
    x1, x2 = x0 + bend, x3 - bend
    points = []
    for i in range(steps + 1):
        t = i / steps
        u = 1 - t
        points.append((u**3 * x0 + 3 * u * u * t * x1 + 3 * u * t * t * x2 + t**3 * x3,
                       u**3 * y0 + 3 * u * u * t * y0 + 3 * u * t * t * y3 + t**3 * y3))
    return points


def render(workflow: dict, names: dict[str, str]) -> Image.Image:
    """The thumbnail of one workflow (notes are left out of the diagram; their heading is the caption)."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for g in range(0, SIZE, 16):
        draw.line([(g, HEADER), (g, SIZE)], fill=GRID)
        draw.line([(0, max(g, HEADER)), (SIZE, max(g, HEADER))], fill=GRID)
    draw.rectangle([0, 0, SIZE, HEADER], fill=(22, 22, 22))
    draw.text((PAD, 10), "InfVSR workflow", font=_font(14), fill=ACCENT)
    caption_font = _font(19)
    for i, line in enumerate(_wrap(draw, heading(workflow), caption_font, SIZE - 2 * PAD)[:2]):
        draw.text((PAD, 28 + 21 * i), line, font=caption_font, fill=TEXT)

    nodes = {n["id"]: n for n in workflow["nodes"] if n["type"] not in NOTE_TYPES}
    if not nodes:
        return image
    left = min(n["pos"][0] for n in nodes.values())
    top = min(n["pos"][1] - TITLE_BAR for n in nodes.values())
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    area_w, area_h = SIZE - 2 * PAD, SIZE - HEADER - 2 * PAD
    scale = min(area_w / (right - left), area_h / (bottom - top))
    off_x = PAD + (area_w - (right - left) * scale) / 2
    off_y = HEADER + PAD + (area_h - (bottom - top) * scale) / 2

    def at(x: float, y: float) -> tuple[float, float]:
        return off_x + (x - left) * scale, off_y + (y - top) * scale

    def slot_y(node: dict, index: int) -> float:
        return node["pos"][1] + (index + 0.7) * 20

    for link in workflow["links"]:
        _, source, out_slot, target, in_slot, kind = link[:6]
        if source not in nodes or target not in nodes:
            continue
        s, t = nodes[source], nodes[target]
        start = at(s["pos"][0] + s["size"][0], slot_y(s, out_slot))
        end = at(t["pos"][0], slot_y(t, in_slot))
        draw.line(_bezier(start, end), fill=LINK_COLOURS.get(kind, DEFAULT_LINK), width=2, joint="curve")

    label_font = _font(12)
    for node in nodes.values():
        x0, y0 = at(node["pos"][0], node["pos"][1] - TITLE_BAR)
        x1, y1 = at(node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
        bar = y0 + max(4.0, TITLE_BAR * scale)
        ours = node["type"] in names and node["type"] not in CORE_TITLES
        draw.rounded_rectangle([x0, y0, x1, y1], radius=4, fill=NODE_BODY, outline=NODE_OUTLINE)
        draw.rounded_rectangle([x0, y0, x1, bar], radius=4, fill=TITLE_OURS if ours else TITLE_CORE)
        title = node.get("title") or names.get(node["type"], node["type"])
        title = title.removeprefix("InfVSR ")  # the caption says InfVSR; small boxes keep the words that differ
        lines = _wrap(draw, title, label_font, x1 - x0 - 6)
        fits = max(1, int((y1 - bar - 4) // 14))
        for i, line in enumerate(lines[:fits]):
            draw.text((x0 + 4, bar + 3 + 14 * i), line, font=label_font, fill=TEXT)
    return image


def fingerprint(workflow: dict, names: dict[str, str]) -> str:
    """What a thumbnail is drawn from (node types, titles, places and sizes, links, heading), hashed."""
    drawn = {
        "drawing": DRAWING,
        "heading": heading(workflow),
        "nodes": sorted([n["id"], n["type"], n.get("title") or names.get(n["type"], n["type"]), n["pos"], n["size"]]
                        for n in workflow["nodes"] if n["type"] not in NOTE_TYPES),
        "links": sorted(link[:6] for link in workflow["links"]),
    }
    return "infvsr-thumbnail " + hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest()


def encode(image: Image.Image, stamp: str) -> bytes:
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True, comment=stamp)
    return buffer.getvalue()


def stamp_of(path: Path) -> str | None:
    """The fingerprint a shipped thumbnail was drawn from, or None."""
    if not path.is_file():
        return None
    with Image.open(path) as image:
        comment = image.info.get("comment")
    return comment.decode() if isinstance(comment, bytes) else comment


def thumbnails() -> dict[Path, tuple[dict, str]]:
    """Each workflow's thumbnail path, with the workflow and its fingerprint."""
    names = display_names()
    out = {}
    for path in sorted(WORKFLOWS.glob("*.json")):
        workflow = json.loads(path.read_text())
        out[path.with_suffix(".jpg")] = (workflow, fingerprint(workflow, names))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the shipped thumbnails")
    args = parser.parse_args(argv)
    stale = []
    names = display_names()
    for path, (workflow, stamp) in thumbnails().items():
        if stamp_of(path) == stamp:  # drawn from this very workflow already
            continue
        if args.check:
            stale.append(path.name)
            continue
        temporary = path.with_name(f".{path.name}.partial")
        temporary.write_bytes(encode(render(workflow, names), stamp))
        temporary.replace(path)
        print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python tools/make_thumbnails.py)")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
