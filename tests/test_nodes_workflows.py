"""Example workflows and the executor: the UI-format JSON in example_workflows/ matches the nodes'
schemas, and the sketch workflow runs through ComfyUI's own executor on a random SD1.5 model."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy_host

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"))
#: Node types only the frontend knows (notes on the canvas); the frontend never sends them.
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def ui_to_api(workflow: dict) -> dict:
    """Convert a UI-format workflow to an API prompt using the registered nodes' input schemas."""
    import nodes as comfy_nodes
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        cls = comfy_nodes.NODE_CLASS_MAPPINGS[node["type"]]
        spec = cls.INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        linked = {i["name"]: i["link"] for i in node["inputs"] if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, (kind, *opts) in declared.items():
            if name in linked:
                link = links[linked[name]]
                expected = kind if isinstance(kind, str) else "COMBO"
                assert link[5] == expected, f"{node['type']}.{name}: link carries {link[5]}, input takes {expected}"
                inputs[name] = [str(link[1]), link[2]]
                continue
            if isinstance(kind, str) and kind.isupper() and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                continue  # an unconnected socket (optional)
            if not values and name in spec.get("optional", {}):
                continue  # a widget added after the workflow was saved: the frontend gives it its default
            assert values, f"{node['type']}: no widget value left for {name!r}"
            inputs[name] = values.pop(0)
            options = opts[0] if opts else {}
            if options.get("control_after_generate") or name == "seed":
                values.pop(0)  # the frontend's "fixed/randomize" companion widget
            if options.get("image_upload"):
                values.pop(0)
        assert not values, f"{node['type']}: unused widget values {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_match_the_registered_nodes(pack, path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    prompt = ui_to_api(workflow)
    assert any(n["class_type"] == "BPSApply" for n in prompt.values())


def test_example_set_covers_the_documented_cases():
    assert {p.name for p in WORKFLOWS} >= {"BPS Sketch to Image.json", "BPS Omega Schedule.json",
                                           "BPS Sketch and Layout.json"}


class _Server:
    """The progress sink PromptExecutor reports to (the web server's role); messages are read back
    from the executor's own status_messages."""

    client_id = None
    last_node_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


@pytest.fixture()
def run_workflow(pack, sd15_ckpt, full_adapter, tmp_path):
    """Run an example workflow through ComfyUI's PromptExecutor at 64x64 and one sampler step, with
    the random checkpoint, a saved full-width adapter and a random sketch; returns the executor.

    Each test gets a fresh executor, so each loads the checkpoint and adapters anew: they are
    released after the test, or three workflows' models (~5 GB each) pile up in one process.
    """
    import execution
    import folder_paths
    from PIL import Image

    models = tmp_path / "bps"
    models.mkdir()
    pack.bps.save_adapter(models / "bps_sketch.safetensors", full_adapter.network, dtype=torch.float16)
    folder_paths.add_model_folder_path("bps", str(models))
    folder_paths.add_model_folder_path("checkpoints", str(sd15_ckpt.parent))
    sketch = (np.random.default_rng(0).random((80, 96)) > 0.8).astype(np.uint8) * 255
    input_dir = Path(folder_paths.get_input_directory())
    input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sketch).save(input_dir / "bps_test_sketch.png")
    folder_paths.set_output_directory(str(tmp_path / "out"))
    executor = comfy_host.prompt_executor(_Server())

    def run(name: str, edit=lambda prompt: None) -> dict:
        prompt = ui_to_api(json.loads(next(p for p in WORKFLOWS if p.name == name).read_text()))
        for node in prompt.values():
            ins, kind = node["inputs"], node["class_type"]
            if kind == "CheckpointLoaderSimple":
                ins["ckpt_name"] = sd15_ckpt.name
            elif kind == "LoadImage":
                ins["image"] = "bps_test_sketch.png"
            elif kind == "EmptyLatentImage":
                ins.update(width=64, height=64)
            elif kind == "KSampler":
                ins["steps"] = 1
        edit(prompt)
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        assert valid[0], valid
        run.executor.execute(prompt, prompt_id, {}, valid[2])
        return prompt

    run.executor, run.models, run.out = executor, models, tmp_path / "out"
    del executor  # run.executor is the only reference, dropped below
    yield run
    run.executor = None
    comfy_host.release_memory()


def _errors(executor) -> list[dict]:
    return [d for e, d in executor.status_messages if e == "execution_error"]


def test_sketch_workflow_runs_through_comfyuis_executor(run_workflow):
    from PIL import Image

    run_workflow("BPS Sketch to Image.json")
    executor = run_workflow.executor
    assert executor.success, _errors(executor)
    saved = list(run_workflow.out.glob("bps_sketch*.png"))
    assert len(saved) == 1 and Image.open(saved[0]).size == (64, 64)

    # A broken adapter file is a node error with the core library's message, not a crash.
    (run_workflow.models / "broken.safetensors").write_bytes(b"not an adapter")

    def use_broken(prompt):
        for node in prompt.values():
            if node["class_type"] == "BPSLoader":
                node["inputs"]["adapter_name"] = "broken.safetensors"
    run_workflow("BPS Sketch to Image.json", use_broken)
    assert not executor.success and "not a safetensors file" in _errors(executor)[-1]["exception_message"]


def test_omega_schedule_workflow_runs_and_previews_its_schedule(run_workflow):
    prompt = run_workflow("BPS Omega Schedule.json")
    executor = run_workflow.executor
    assert executor.success, _errors(executor)
    assert len(list(run_workflow.out.glob("bps_omega*.png"))) == 1
    preview_id = next(i for i, n in prompt.items() if n["class_type"] == "BPSOmegaPreview")
    shown = executor.history_result["outputs"][preview_id]["images"]
    assert len(shown) == 1 and shown[0]["type"] == "temp"


def test_two_adapters_workflow_runs_with_a_sketch_and_a_layout_adapter(run_workflow, pack):
    """The stacking example queues as shipped once its two adapters exist: a 1-channel sketch adapter
    and a 3-channel layout adapter, each fed by its own Load Image."""
    from PIL import Image

    bps = pack.bps
    layout = comfy_host.steering_network(bps, bps.BPSConfig(hint_channels=3), seed=8)
    bps.save_adapter(run_workflow.models / "bps_layout.safetensors", layout, hint_meaning="layout")
    del layout

    prompt = run_workflow("BPS Sketch and Layout.json")
    executor = run_workflow.executor
    assert executor.success, _errors(executor)
    loaders = sorted(n["inputs"]["adapter_name"] for n in prompt.values() if n["class_type"] == "BPSLoader")
    assert loaders == ["bps_layout.safetensors", "bps_sketch.safetensors"]
    saved = list(run_workflow.out.glob("bps_two_adapters*.png"))
    assert len(saved) == 1 and Image.open(saved[0]).size == (64, 64)
