"""The example workflows in ComfyUI's real frontend, as a new user meets them.

One real ComfyUI server (main.py on a loopback port, this pack in custom_nodes/, a random-weight
SD1.5 checkpoint under the workflows' checkpoint name, random full-width adapters under their
adapter names, the shipped example condition images in input/) and one headless Chromium page
(the system Chromium driven by Playwright) serve every test here. For each file in
example_workflows/: the template browser lists it under the pack with its thumbnail and title;
clicking it loads it (``app.loadGraphData``) with every node type known and no console errors; no
two nodes overlap as the frontend lays them out; the API prompt the frontend builds
(``app.graphToPrompt``), shrunk to 64x64 pixels and 2 steps, runs to success on the server.

Artifacts: a screenshot of the template browser and of each loaded workflow go to
``$BPS_TEST_ARTIFACTS/browser`` (default ``test-artifacts/browser`` in the repo). With
``BPS_WRITE_THUMBNAILS=1`` the run also rewrites each ``example_workflows/NAME.jpg`` from what its
run used and drew (tests/thumbnails.py): the committed thumbnails are that.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest
import torch

import comfy_frontend
import comfy_host
import sdxl_models
import thumbnails
from comfy_server import PACK_DIR_NAME, ComfyServer

ROOT = comfy_host.ROOT
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
EXAMPLE_INPUTS = sorted((ROOT / "example_inputs").glob("*.png"))
#: The pack's label in the template browser (locales/en/main.json names the category).
PACK_LABEL = json.loads((ROOT / "locales" / "en" / "main.json").read_text())[
    "templateWorkflows"]["category"][PACK_DIR_NAME]
ARTIFACTS = Path(os.environ.get("BPS_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "browser"
WRITE_THUMBNAILS = os.environ.get("BPS_WRITE_THUMBNAILS", "") not in ("", "0")
#: Checkpoint names the workflows load that are SDXL: served by the reduced-width SDXL checkpoint
#: (tests/sdxl_models.py), every other name by the SD1.5 one.
SDXL_CHECKPOINTS = {"sd_xl_base_1.0.safetensors"}
#: Frontend-only node types: drawn on the canvas, never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote"}

pytestmark = pytest.mark.skipif(comfy_frontend.skip_reason() is not None,
                                reason=comfy_frontend.skip_reason() or "")


def _workflow(path: Path) -> dict:
    return json.loads(path.read_text())


def _widget(path: Path, node_type: str) -> list[str]:
    """The first widget value (a file name) of every node of ``node_type`` in a workflow."""
    return [n["widgets_values"][0] for n in _workflow(path)["nodes"] if n["type"] == node_type]


@pytest.fixture(scope="module")
def adapters(pack, tmp_path_factory) -> dict[str, Path]:
    """Random adapters under the names the workflows load: full-width SD1.5 ones, 1-channel for the
    sketch adapter and 3-channel for the layout one (~1.3 GB each in fp16), and a 1-channel one for
    the reduced SDXL checkpoint that serves the SDXL workflow; written once per session."""
    bps = pack.bps
    folder = tmp_path_factory.mktemp("bps_adapters")
    sdxl = bps.UNetShape.from_unet_config(sdxl_models.reduced_sdxl_config(
        comfy_host.trainer_pack().train.random_checkpoint))
    channels = {"bps_sketch.safetensors": (1, "sketch", bps.SD15_SHAPE),
                "bps_layout.safetensors": (3, "layout", bps.SD15_SHAPE),
                "bps_sketch_xl.safetensors": (1, "sketch", sdxl)}
    names = sorted({name for path in WORKFLOWS for name in _widget(path, "BPSLoader")})
    assert set(names) <= set(channels), f"a workflow loads an adapter this test does not build: {names}"
    written = {}
    for seed, name in enumerate(names, start=1):
        hint_channels, meaning, shape = channels[name]
        net = comfy_host.steering_network(bps, bps.BPSConfig.for_unet(shape, hint_channels=hint_channels), seed=seed)
        bps.save_adapter(folder / name, net, dtype=torch.float16, hint_meaning=meaning,
                         unet=None if shape is bps.SD15_SHAPE else shape)
        del net  # one 2.7 GB fp32 network at a time
        comfy_host.release_memory()
        written[name] = folder / name
    return written


@pytest.fixture(scope="module")
def server(comfyui_host, sd15_ckpt, sdxl_reduced_ckpts, adapters, tmp_path_factory):
    """The one server for every workflow: models under the workflows' names (SDXL names served by
    the reduced SDXL checkpoint, which a test custom node teaches the server's model detection), the
    example images in input/. Models stay loaded between workflows (they share the checkpoint and
    the sketch adapter)."""
    with ComfyServer(tmp_path_factory.mktemp("browser_server")) as s:
        sdxl_models.add_reduced_sdxl_detection(s.base)
        for name in sorted({n for path in WORKFLOWS for n in _widget(path, "CheckpointLoaderSimple")}):
            s.add_model("checkpoints", sdxl_reduced_ckpts["eps"] if name in SDXL_CHECKPOINTS else sd15_ckpt, name)
        for name, path in adapters.items():
            s.add_model("bps", path, name)
        for image in EXAMPLE_INPUTS:
            s.add_input(image)
        s.start()
        yield s
        peak = _peak_rss_gib(s.process.pid)
        print(f"\nbrowser test server: peak RSS {peak:.2f} GiB; pytest process: peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def _peak_rss_gib(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), in GiB; 0 if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.fixture(scope="module")
def frontend(server):
    """One Chromium page on the server's frontend, opened as a first-time visitor opens it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with comfy_frontend.Frontend(server.url) as page:
        page.open()
        page.wait_for_first_visit_templates()  # or it pops up over a later step
        yield page


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_loads_cleanly_lays_out_and_runs(frontend, server, path):
    workflow = _workflow(path)
    node_ids = [n["id"] for n in workflow["nodes"]]

    # Load it as a user does: from its card in the template browser.
    frontend.open_templates()
    frontend.select_template_category(PACK_LABEL)
    frontend.template_cards()  # the thumbnails have loaded: their requests are not the workflow's
    mark = len(frontend.errors)
    frontend.load_template(path.stem, node_ids)
    time.sleep(1.0)  # let the LoadImage previews fetch their images from input/ (a missing one is a 404)
    nodes = frontend.graph_nodes()
    assert [n["type"] for n in sorted(nodes, key=lambda n: n["id"])] == \
        [n["type"] for n in sorted(workflow["nodes"], key=lambda n: n["id"])]
    unknown = [n for n in nodes if not n["registered"] or n["has_errors"]]
    assert unknown == [], f"missing or broken node types: {unknown}"

    overlaps = comfy_frontend.overlapping_pairs(frontend.node_boxes())
    assert overlaps == [], "nodes drawn on top of each other:\n" + "\n".join(
        f"  {a.title} ({a.id}) and {b.title} ({b.id})" for a, b in overlaps)

    frontend.capture_graph(ARTIFACTS / f"{path.stem}.png")
    assert frontend.errors[mark:] == [], "the frontend reported errors while loading the workflow"

    # The prompt the frontend builds, shrunk, runs on the server.
    prompt = frontend.graph_to_prompt()
    assert set(prompt) == {str(n["id"]) for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY}
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    result = server.run(prompt, timeout=540)
    history = result.history
    saved = [image for node_id, node in prompt.items() if node["class_type"] == "SaveImage"
             for image in history.get("outputs", {}).get(node_id, {}).get("images", [])]
    assert len(saved) == 1, f"SaveImage reported {saved}; history: {json.dumps(history)[:3000]}"
    assert (server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]).is_file()
    from PIL import Image
    with Image.open(server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]) as image:
        assert image.size == (64, 64)
    print(f"\n{path.stem}: ran in {result.seconds:.1f} s")

    if WRITE_THUMBNAILS:  # from what this run used and drew: its condition images, its omega plot
        conditions = [server.input_dir / node["inputs"]["image"] for _, node in sorted(prompt.items())
                      if node["class_type"] == "LoadImage"]

        def shown_by(class_type: str) -> list[Path]:
            return [server.base / image["type"] / image["subfolder"] / image["filename"]
                    for node_id, node in sorted(prompt.items()) if node["class_type"] == class_type
                    for image in history["outputs"][node_id]["images"]]
        tile = thumbnails.thumbnail(conditions, shown_by("BPSOmegaPreview"), made=shown_by("BPSConditionFromImage"))
        path.with_suffix(".jpg").write_bytes(thumbnails.jpeg(tile))


def test_the_template_browser_lists_every_example_under_the_pack_with_thumbnail_and_title(frontend):
    """After the workflow tests, so a BPS_WRITE_THUMBNAILS=1 run checks the thumbnails it just wrote."""
    frontend.open_templates()
    frontend.select_template_category(PACK_LABEL)
    mark = len(frontend.errors)
    cards = {card["name"]: card for card in frontend.template_cards()}
    frontend.screenshot(ARTIFACTS / "template_browser.png")
    assert sorted(cards) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        card = cards[path.stem]
        assert card["title"] == path.stem, card  # the frontend titles a pack's template by its file name
        thumbnail_url = f"{frontend.url}/api/workflow_templates/{PACK_DIR_NAME}/{path.stem}.jpg"
        assert (200, thumbnail_url) in frontend.responses, f"{thumbnail_url} was not served"
        assert card["thumbnail_width"] > 0, f"{path.stem}.jpg did not load: {card}"
    assert frontend.errors[mark:] == []
