"""The pack in a real ComfyUI server (main.py on a loopback port), driven over HTTP and the websocket
as a user's browser drives it: the nodes register, a prompt runs to success, and a broken adapter
file fails its prompt with a clear message while the server keeps serving."""

from __future__ import annotations

import pytest

from comfy_server import ComfyServer, PromptFailed

NODES = ("BPSLoader", "BPSApply", "BPSOmegaSchedule", "BPSOmegaPreview", "BPSHintPreprocessor",
         "BPSConditionFromImage")


@pytest.fixture(scope="module")
def server(comfyui_host, tmp_path_factory):
    """One model-free server for the module: these tests need the pack, not SD1.5."""
    base = tmp_path_factory.mktemp("server")
    (base / "models" / "bps").mkdir(parents=True)
    # Not an adapter: a text file under an adapter's name, as a broken download would leave.
    (base / "models" / "bps" / "broken.safetensors").write_bytes(b"<html>404 Not Found</html>")
    with ComfyServer(base) as s:
        s.start()
        yield s


def test_every_node_registers_under_the_pack_category(server):
    info = server.object_info()
    missing = [n for n in NODES if n not in info]
    assert not missing, f"not registered: {missing}; server log:\n{server.log_tail()}"
    assert {info[n]["category"] for n in NODES} == {"conditioning/bps"}
    log = server.log_path.read_text()
    assert "seconds: " + str(server.base / "custom_nodes" / "ComfyUI-BPS") in log  # ComfyUI imported it
    assert "ComfyUI-BPS" not in "".join(line for line in log.splitlines() if "IMPORT FAILED" in line)
    kind, options = info["BPSLoader"]["input"]["required"]["adapter_name"][:2]
    assert kind == "COMBO" and options["options"] == ["broken.safetensors"]  # models/bps of the server


def test_a_prompt_runs_to_success_and_saves_its_image(server):
    prompt = {
        "1": {"class_type": "BPSOmegaSchedule",
              "inputs": {"preset": "paper", "encoder": 1.0, "middle": 1.0, "decoder": 0.5, "overrides": "",
                         "curve": "cosine", "keyframes": "0.0:1.0, 1.0:0.0"}},
        "2": {"class_type": "BPSOmegaPreview",
              "inputs": {"omega": ["1", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0,
                         "width": 256, "height": 256}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bps_server_test"}},
    }
    result = server.run(prompt, timeout=120)
    images = result.outputs("3")["images"]
    assert len(images) == 1 and (server.output_dir / images[0]["filename"]).stat().st_size > 1000
    assert set(result.executed_nodes()) == {"1", "2", "3"}
    again = server.run(prompt, timeout=120)  # same prompt: ComfyUI serves every node from its cache
    assert set(again.cached_nodes()) == {"1", "2", "3"} and not again.executed_nodes()


def test_a_broken_adapter_fails_its_prompt_and_the_server_keeps_serving(server):
    prompt = {"1": {"class_type": "BPSLoader", "inputs": {"adapter_name": "broken.safetensors"}},
              "2": {"class_type": "BPSOmegaPreview",
                    "inputs": {"bps_adapter": ["1", 0], "strength": 1.0, "start_percent": 0.0,
                               "end_percent": 1.0, "width": 256, "height": 256}},
              "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    with pytest.raises(PromptFailed) as failure:
        server.run(prompt, timeout=120)
    message = failure.value.details["exception_message"]
    assert "broken.safetensors" in message and "not a safetensors file" in message
    assert server.process.poll() is None
    assert "BPSLoader" in server.object_info()  # still answering
