"""The example workflows as an artist opens them: laid out left to right at fit-to-view, nothing overlapping or cut
off, a note that says which clip to pick, and a template thumbnail that shows the workflow.

The sizes below follow ComfyUI's frontend (LiteGraph, frontend 1.27): a node's title bar (30 px) sits above its
`pos`; a title is cut when it is wider than the node less 60 px; the body holds one 20 px row per slot, then one
24 px row per widget, then a video preview as wide as the node (16:9 assumed); a node smaller than that grows
when the workflow loads. tests/test_comfy_integration.py checks the same things in the real frontend.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import nodes

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
TITLE_BAR = 30
GAP = 10  # each side: keeps the node-source badge above a title bar off the node above
TITLE_MARGIN = 60  # the frontend leaves 2 x title height for the collapse dot and the title's right end
CHAR_WIDTH = 7.5  # a generous width of one character of the 14 px title font (the frontend measured <= 7.2)
SLOT_ROW, WIDGET_ROW, WIDGETS_PAD, BODY_PAD = 20, 24, 8, 6
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
NOTE_TYPES = {"Note", "MarkdownNote"}
CORE_NODES = {"ImageBatch": ("Batch Images", 2, 1, 0)}  # title, slot inputs, outputs, widgets
JS_WIDGETS = {"InfVSRVideoStream": 1}  # the stop button that web/infvsr.js adds


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node as drawn: its title bar above `pos`, and the badge margin."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x - GAP, y - TITLE_BAR - GAP, x + w + GAP, y + h + GAP


def node_spec(kind: str) -> tuple[str, int, int, int, bool]:
    """(title, slot inputs, outputs, widgets, has a video preview) of a node type, from its definition."""
    if kind in CORE_NODES:
        return (*CORE_NODES[kind], False)
    cls = nodes.NODE_CLASS_MAPPINGS[kind]
    spec = cls.INPUT_TYPES()
    inputs = [*spec.get("required", {}).values(), *spec.get("optional", {}).values()]
    widgets = [i for i in inputs if isinstance(i[0], list) or i[0] in WIDGET_TYPES]
    upload = any(len(i) > 1 and i[1].get("video_upload") for i in widgets)
    slots = len(inputs) - len(widgets)
    count = len(widgets) + int(upload) + JS_WIDGETS.get(kind, 0)
    return nodes.NODE_DISPLAY_NAME_MAPPINGS[kind], slots, len(cls.RETURN_TYPES), count, upload


def min_height(node: dict) -> float:
    """The height the frontend gives a node: at least its computed size when the workflow loads (slots, widgets, 8 px
    below them, 6 px), and, once a video preview has loaded, enough for the preview below the widgets."""
    _, slots, outputs, widgets, preview = node_spec(node["type"])
    height = max(slots, outputs) * SLOT_ROW + BODY_PAD + widgets * WIDGET_ROW
    if not widgets:
        return height
    return height + max(WIDGETS_PAD, node["size"][0] * 9 / 16 if preview else 0)


def note_text(workflow: dict) -> str:
    return "\n".join(str(v) for n in workflow["nodes"] if n["type"] in NOTE_TYPES for v in n.get("widgets_values", []))


def layout_problems(workflow: dict) -> list[str]:
    """Everything that makes a workflow hard to read at fit-to-view, in words; empty when it reads well."""
    problems = []
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for a, b in itertools.combinations(workflow["nodes"], 2):
        (al, at, ar, ab), (bl, bt, br, bb) = rect(a), rect(b)
        if al < br and bl < ar and at < bb and bt < ab:
            problems.append(f"{a['type']} #{a['id']} overlaps {b['type']} #{b['id']}")
    for link in workflow["links"]:
        _, source, _, target, _, kind = link[:6]
        s, t = by_id[source], by_id[target]
        if s["pos"][0] + s["size"][0] >= t["pos"][0]:
            problems.append(f"{kind} link #{link[0]} runs right to left: "
                            f"{s['type']} #{source} -> {t['type']} #{target}")
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        title, *_ = node_spec(node["type"])
        title = node.get("title") or title
        if len(title) * CHAR_WIDTH > node["size"][0] - TITLE_MARGIN:
            problems.append(f"the title '{title}' is cut: {node['type']} #{node['id']} is {node['size'][0]} wide")
        if node["size"][1] < min_height(node) - 1:  # the frontend rounds
            problems.append(f"{node['type']} #{node['id']} is {node['size'][1]} tall; its widgets need "
                            f"{min_height(node):.0f} (it would grow over what lies below)")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_reads_left_to_right_without_overlaps(path):
    assert layout_problems(load(path)) == []


def test_the_check_sees_a_cramped_layout():
    """The layout the issue reported (chained workflow before): cut title, overlapping nodes, a backward link."""
    workflow = load(ROOT / "workflows" / "infvsr_chained_chunks.json")
    by_type = {}
    for node in workflow["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    by_type["ImageBatch"][0]["size"] = [140, 46]
    by_type["MarkdownNote"][0].update(pos=[0, -260], size=[560, 220])
    loader = by_type["LoadInfVSRModel"][0]
    loader.update(pos=[0, 0], size=[270, 226])
    first, second = sorted(by_type["InfVSRChunkUpscale"], key=lambda n: n["id"])
    second["pos"] = list(first["pos"])
    second["pos"][1] += 300
    problems = "\n".join(layout_problems(workflow))
    assert "'Batch Images' is cut" in problems
    assert "MarkdownNote" in problems and "overlaps" in problems
    assert "INFVSR_CACHE link" in problems and "right to left" in problems
    assert "LoadInfVSRModel" in problems and "widgets need" in problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_match_the_node_slots(path):
    """Every link is recorded at both ends, as the editor saves them (a hand edit can break that)."""
    workflow = load(path)
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, out_slot, target, in_slot, kind in (link[:6] for link in workflow["links"]):
        assert link_id in by_id[source]["outputs"][out_slot]["links"]
        assert by_id[target]["inputs"][in_slot]["link"] == link_id
        assert by_id[target]["inputs"][in_slot]["type"] == by_id[source]["outputs"][out_slot]["type"] == kind
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    assert workflow["last_node_id"] >= max(by_id)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_note_says_which_clip_to_pick(path):
    """The example clip is not shipped: the note names the upload button and every node whose clip to set."""
    workflow = load(path)
    text = note_text(workflow)
    assert "choose file to upload" in text
    pickers = [n for n in workflow["nodes"] if n["type"] in nodes.NODE_CLASS_MAPPINGS and node_spec(n["type"])[4]]
    assert pickers
    for node in pickers:
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node["type"]].split(" (")[0] in text, node["type"]


def test_no_example_starts_past_the_end_of_a_short_clip():
    """A fixed range is only safe at the clip's start: a later part must take the rest of the clip
    (frame_count 0), and start where an InfVSR clip of the note's minimum length still has frames."""
    for path in WORKFLOWS:
        for node in load(path)["nodes"]:
            if node["type"] != "InfVSRLoadVideoFrames":
                continue
            _, start, count, _ = node["widgets_values"]
            if start > 0:
                assert count == 0, f"{path.name}: a range from frame {start} must run to the end of the clip"
                assert f"longer than {start} frames" in note_text(load(path)), path.name


def _thumbnails() -> Any:
    spec = importlib.util.spec_from_file_location("make_thumbnails", ROOT / "tools" / "make_thumbnails.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_has_its_thumbnail(path):
    """ComfyUI's template browser shows NAME.jpg beside NAME.json: a real JPEG, drawn from the workflow as it is
    now (its fingerprint, the JPEG's comment, changes with any node, link or heading)."""
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} is missing: run python tools/make_thumbnails.py"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG"
        image.verify()
    tool = _thumbnails()
    workflow = load(path)
    assert tool.stamp_of(thumbnail) == tool.fingerprint(workflow, tool.display_names()), (
        f"{thumbnail.name} was drawn from another version of {path.name}: run python tools/make_thumbnails.py")
    with Image.open(thumbnail) as image:
        assert image.size[0] >= 256 and image.size[0] == image.size[1]
        grey = image.convert("L")
    background = sum(tool.BACKGROUND) / 3
    drawn = sum(count for level, count in enumerate(grey.histogram()) if abs(level - background) > 24)
    assert drawn > 0.05 * grey.size[0] * grey.size[1], "hardly anything is drawn"


def test_the_fingerprint_follows_the_workflow():
    tool = _thumbnails()
    names = tool.display_names()
    workflow = load(WORKFLOWS[0])
    before = tool.fingerprint(workflow, names)
    workflow["nodes"][0]["pos"][0] += 10
    assert tool.fingerprint(workflow, names) != before
