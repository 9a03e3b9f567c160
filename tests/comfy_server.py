"""A real ComfyUI server for tests and benchmarks: ComfyUI's own ``main.py`` in a subprocess.

What a user runs: the server on a loopback port, this pack found as a custom node in
``custom_nodes/``, models in ``models/<folder>/``, API prompts posted to ``/prompt``, progress read
from the websocket, results from ``/history`` and the output folder. Everything lives under one
base directory (``--base-directory``), so a test or benchmark leaves nothing in the ComfyUI
checkout and several servers can run side by side.

    with ComfyServer(tmp_path) as server:            # nothing is started until start()/with
        server.add_model("checkpoints", ckpt_file)    # symlinked, never copied
        server.start()
        result = server.run(prompt)                   # raises PromptFailed with the node's error
        result.step_seconds()                         # sampler step durations from the progress events

ComfyUI comes from ``COMFYUI_PATH`` (see comfy_host.py); the server runs with this interpreter.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import comfy_host

#: Name of this pack's folder inside the server's custom_nodes/ (a symlink to the repo root).
PACK_DIR_NAME = "ComfyUI-BPS"
#: Websocket events that end a prompt.
_FINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


class ServerError(RuntimeError):
    """The server did not start or died; the message ends with the tail of its log."""


class PromptFailed(RuntimeError):
    """ComfyUI refused a prompt or a node raised; ``details`` holds what the server said."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


@dataclass
class Event:
    """One websocket message, stamped with ``time.monotonic()`` when it arrived."""

    time: float
    type: str
    data: dict


@dataclass
class PromptResult:
    """A finished prompt: its history entry and the websocket events that belong to it."""

    prompt_id: str
    history: dict
    events: list[Event] = field(default_factory=list)
    queued_at: float = 0.0
    finished_at: float = 0.0

    @property
    def seconds(self) -> float:
        """Wall time from posting the prompt to its execution_success."""
        return self.finished_at - self.queued_at

    def outputs(self, node_id: str | int) -> dict:
        """The ``ui`` output a node reported (images, latents ...), as /history holds it."""
        return self.history.get("outputs", {}).get(str(node_id), {})

    def executed_nodes(self) -> list[str]:
        """Node ids the server executed (not served from its cache), in order."""
        return [str(e.data["node"]) for e in self.events if e.type == "executing" and e.data.get("node") is not None]

    def cached_nodes(self) -> list[str]:
        """Node ids the server took from its cache."""
        return [str(n) for e in self.events if e.type == "execution_cached" for n in e.data.get("nodes", [])]

    def step_seconds(self, node_id: str | int | None = None) -> list[float]:
        """Durations of the sampler steps, from consecutive ``progress`` events of one node.

        The first interval is from the node's ``executing`` event to its first progress event, so
        it includes model loading; callers that want steady-state steps drop it.
        """
        progress = [e for e in self.events if e.type == "progress"
                    and (node_id is None or str(e.data.get("node")) == str(node_id))]
        if not progress:
            return []
        node = str(progress[0].data.get("node"))
        start = next((e.time for e in self.events if e.type == "executing" and str(e.data.get("node")) == node),
                     progress[0].time)
        stamps = [start] + [e.time for e in progress]
        return [b - a for a, b in zip(stamps, stamps[1:])]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's ``main.py`` with this pack, on 127.0.0.1, rooted in ``base_dir``.

    Args:
        base_dir: folder for models/, input/, output/, temp/, user/ and custom_nodes/ (created).
        comfyui: the ComfyUI checkout; default ``COMFYUI_PATH``.
        pack: the pack to install as a custom node; default this repo.
        extra_args: more ``main.py`` flags (e.g. ``["--cache-lru", "10"]``).
        env: extra environment variables for the server process.
    """

    def __init__(self, base_dir: str | os.PathLike, *, comfyui: str | os.PathLike | None = None,
                 pack: str | os.PathLike = comfy_host.ROOT, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None):
        self.base = Path(base_dir).resolve()
        root = comfyui or comfy_host.comfyui_path()
        if root is None:
            raise ServerError(comfy_host.SKIP_REASON)
        self.comfyui = Path(root).resolve()
        self.pack = Path(pack).resolve()
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.port: int | None = None
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._ws_thread: threading.Thread | None = None
        self._ws_stop: asyncio.Event | None = None
        self._ws_loop: asyncio.AbstractEventLoop | None = None
        for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(self.pack, target_is_directory=True)

    # ------------------------------------------------------------------------- files
    @property
    def log_path(self) -> Path:
        """The server's combined stdout/stderr."""
        return self.base / "server.log"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def model_dir(self, folder: str) -> Path:
        """``models/<folder>`` of this server (created)."""
        path = self.base / "models" / folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_model(self, folder: str, source: str | os.PathLike, name: str | None = None) -> Path:
        """Make ``source`` available as ``models/<folder>/<name>`` (a symlink: no 2 GB copies)."""
        source = Path(source).resolve()
        target = self.model_dir(folder) / (name or source.name)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source)
        return target

    def add_input(self, source: str | os.PathLike, name: str | None = None) -> Path:
        """Copy an image into ``input/`` (what LoadImage lists)."""
        target = self.input_dir / (name or Path(source).name)
        shutil.copyfile(source, target)
        return target

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------------- life cycle
    def command(self) -> list[str]:
        """The exact ``main.py`` command line this server runs."""
        return [sys.executable, str(self.comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
                "--disable-api-nodes", "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
                *self.extra_args]

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        """Start the server and its websocket listener; return once ``/system_stats`` answers."""
        if self.process is not None:
            return self
        self.port = free_port()
        self._log_file = open(self.log_path, "ab")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.command(), cwd=self.comfyui, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self._close_log()
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} while starting; log:\n"
                                  f"{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s; log:\n{self.log_tail()}")
                time.sleep(0.5)
        self._start_websocket()
        return self

    def stop(self) -> None:
        """Stop the websocket listener and the server (SIGTERM, then SIGKILL after 20 s)."""
        if self._ws_loop is not None and self._ws_stop is not None:
            self._ws_loop.call_soon_threadsafe(self._ws_stop.set)
        if self._ws_thread is not None:
            self._ws_thread.join(timeout=10)
        self._ws_thread = self._ws_loop = self._ws_stop = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.process = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------- websocket
    def _start_websocket(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def listen() -> None:
            import aiohttp
            self._ws_stop = asyncio.Event()
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.ws_connect(f"{self.url}/ws?clientId={self.client_id}",
                                                  max_msg_size=0) as ws:
                        ready.set()
                        stop = asyncio.ensure_future(self._ws_stop.wait())
                        while not self._ws_stop.is_set():
                            receive = asyncio.ensure_future(ws.receive())
                            done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                            if receive not in done:
                                receive.cancel()
                                break
                            msg = receive.result()
                            if msg.type == aiohttp.WSMsgType.TEXT:
                                payload = json.loads(msg.data)
                                event = Event(time.monotonic(), payload.get("type", ""), payload.get("data") or {})
                                with self._cond:
                                    self._events.append(event)
                                    self._cond.notify_all()
                            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                break
                        stop.cancel()
            except BaseException as e:  # noqa: BLE001 - reported to start()
                failure.append(e)
                ready.set()

        def thread_main() -> None:
            self._ws_loop = asyncio.new_event_loop()
            try:
                self._ws_loop.run_until_complete(listen())
            finally:
                self._ws_loop.close()

        self._ws_thread = threading.Thread(target=thread_main, name="comfyui-ws", daemon=True)
        self._ws_thread.start()
        if not ready.wait(timeout=30) or failure:
            self.stop()
            raise ServerError(f"cannot open the websocket of {self.url}: {failure[0] if failure else 'timeout'}")

    def events(self) -> list[Event]:
        """Every websocket event received so far (a copy)."""
        with self._cond:
            return list(self._events)

    # ------------------------------------------------------------------------- HTTP
    def get_json(self, path: str, timeout: float = 30) -> Any:
        """GET ``path`` and decode its JSON."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: Any, timeout: float = 30) -> Any:
        """POST ``body`` as JSON to ``path``; an HTTP error becomes PromptFailed with the server's answer."""
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                text = r.read()
        except urllib.error.HTTPError as e:
            answer = e.read().decode(errors="replace")
            try:
                details = json.loads(answer)
            except ValueError:
                details = answer
            raise PromptFailed(f"POST {path} answered {e.code}: {answer[:2000]}", details) from None
        return json.loads(text) if text else None

    # ------------------------------------------------------------------------- prompts
    def queue(self, prompt: dict) -> str:
        """Queue an API-format prompt; return its id. Refused prompts raise PromptFailed."""
        # Canonical hyphenated lowercase: ComfyUI 0.33 refuses any other prompt_id (0.8 took any string).
        prompt_id = str(uuid.uuid4())
        self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id})
        return prompt_id

    def wait(self, prompt_id: str, timeout: float = 600.0, queued_at: float | None = None) -> PromptResult:
        """Block until ``prompt_id`` finishes; return its result or raise PromptFailed with the node error."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                final = next((e for e in self._events if e.type in _FINAL_EVENTS
                              and e.data.get("prompt_id") == prompt_id), None)
                if final is not None:
                    break
                if self.process is None or self.process.poll() is not None:
                    raise ServerError(f"ComfyUI died while running prompt {prompt_id}; log:\n{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; log:\n"
                                       f"{self.log_tail()}")
                self._cond.wait(timeout=min(left, 1.0))
            events = [e for e in self._events if e.data.get("prompt_id") == prompt_id]
        if final.type != "execution_success":
            data = final.data
            raise PromptFailed(f"prompt {prompt_id} ended with {final.type}: node {data.get('node_type')} "
                               f"({data.get('node_id')}): {data.get('exception_type')}: "
                               f"{data.get('exception_message')}", data)
        history = self._history(prompt_id)
        start = queued_at if queued_at is not None else events[0].time
        return PromptResult(prompt_id, history, events, start, final.time)

    def _history(self, prompt_id: str, timeout: float = 60.0) -> dict:
        # execution_success is sent from inside the executor; the worker files the history entry
        # (outputs included) only after the executor returns, so poll until it is there.
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed"):
                return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} succeeded but its history entry did not appear within "
                                   f"{timeout:.0f} s; log:\n{self.log_tail()}")
            time.sleep(0.05)

    def run(self, prompt: dict, timeout: float = 600.0) -> PromptResult:
        """Queue ``prompt`` and wait for it (one prompt at a time: the timing is the prompt's own)."""
        queued_at = time.monotonic()
        return self.wait(self.queue(prompt), timeout=timeout, queued_at=queued_at)

    def object_info(self, node_type: str | None = None) -> dict:
        """``/object_info`` (every registered node's schema), or one node's."""
        info = self.get_json("/object_info" + (f"/{node_type}" if node_type else ""))
        return info[node_type] if node_type else info

    def free_memory(self) -> None:
        """Ask the server to unload its models and drop its cache (``/free``)."""
        self.post_json("/free", {"unload_models": True, "free_memory": True})


def add_euler_sampler(prompt: dict, name: str, model: list, latent: list, *, seed: int, steps: int, cfg: float,
                      positive: list = ("2", 0), negative: list = ("3", 0)) -> None:
    """Add a KSampler (euler, normal) on ``model`` and a Save Latent of its output under ``name``
    to an API ``prompt``: nodes ``<name>_sampler`` and ``<name>_save``."""
    prompt[f"{name}_sampler"] = {
        "class_type": "KSampler",
        "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
                   "scheduler": "normal", "positive": list(positive), "negative": list(negative),
                   "latent_image": latent, "denoise": 1.0}}
    prompt[f"{name}_save"] = {"class_type": "SaveLatent",
                              "inputs": {"samples": [f"{name}_sampler", 0], "filename_prefix": name}}
