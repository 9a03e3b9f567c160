"""ComfyUI's own frontend in headless Chromium, driven by Playwright, for the browser tests.

The frontend is the ``comfyui-frontend-package`` that ComfyUI's requirements install, served by a
real ComfyUI server (tests/comfy_server.py); the browser is the system Chromium (Debian's
``chromium`` package), never a browser Playwright downloads. Everything here is what a user does
or sees: the template browser, a template card's click (which calls ``app.loadGraphData``), the
graph as the frontend laid it out, the API prompt the frontend builds (``app.graphToPrompt``).
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Patience for any one step of the frontend (page load, dialog, template card, graph).
UI_TIMEOUT_MS = 180_000
#: The dialog "Browse Templates" opens (and that a first-time user sees on the first visit): a
#: PrimeVue dialog with its own class up to the frontend of ComfyUI 0.8, a Reka dialog labelled by
#: its "global-workflow-template-selector" header in the frontend 1.49 of ComfyUI 0.33. Its template
#: cards are ``[data-testid='template-workflow-<name>']`` in both.
TEMPLATE_DIALOG = (":is(.workflow-template-selector-dialog, "
                   "[role='dialog'][aria-labelledby='global-workflow-template-selector'])")
#: Frontend 1.35 (ComfyUI 0.8) matches both forms, its labelled dialog and the classed panel inside
#: it, so locators take the outermost match (the first in document order).


def chromium_executable() -> str | None:
    """The Chromium to drive: ``BPS_CHROMIUM``, else ``chromium`` on PATH, else None."""
    explicit = os.environ.get("BPS_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None when Playwright and Chromium are present."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright; the browser comes from apt)"
    if chromium_executable() is None:
        return ("Chromium is not installed: the browser tests drive the system Chromium "
                "(apt-get install chromium, or set BPS_CHROMIUM=/path/to/chromium)")
    return None


@dataclass
class NodeBox:
    """A node as the frontend placed it: its bounding box on the canvas, title bar included."""

    id: int
    type: str
    title: str
    x: float
    y: float
    width: float
    height: float

    def overlaps(self, other: "NodeBox") -> bool:
        """True when the two boxes share an area (touching edges do not count)."""
        return (self.x < other.x + other.width and other.x < self.x + self.width
                and self.y < other.y + other.height and other.y < self.y + self.height)


def overlapping_pairs(nodes: list[NodeBox]) -> list[tuple[NodeBox, NodeBox]]:
    """Every pair of nodes whose boxes overlap, each pair once."""
    return [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:] if a.overlaps(b)]


class Frontend:
    """One headless Chromium page on a ComfyUI server's frontend.

    Console errors and uncaught page errors are collected in ``errors`` (with failed HTTP
    responses, which Chromium reports only as "Failed to load resource"), so a test can assert that
    a step added none: ``mark = len(frontend.errors)`` before, ``frontend.errors[mark:]`` after.
    """

    def __init__(self, url: str, *, width: int = 1920, height: int = 1200):
        self.url = url
        self.viewport = {"width": width, "height": height}
        self.errors: list[str] = []
        #: (status, decoded URL) of every response, in order: what the page fetched and how it went.
        self.responses: list[tuple[int, str]] = []
        self._playwright = self._browser = self.page = None

    # ------------------------------------------------------------------------- life cycle
    def __enter__(self) -> "Frontend":
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        try:
            # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
            self._browser = self._playwright.chromium.launch(
                executable_path=chromium_executable(), headless=True,
                args=["--no-sandbox", "--disable-dev-shm-usage"])
            self.page = self._browser.new_page(viewport=self.viewport)
            # On 2 busy CPU cores the server and the frontend can take far longer than Playwright's
            # 30 s default to answer; a slow machine must not read as a broken workflow.
            self.page.set_default_timeout(UI_TIMEOUT_MS)
            self.page.on("console", self._on_console)
            self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
            self.page.on("response", self._on_response)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the browser and stop Playwright's driver (idempotent)."""
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None

    def _on_console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console error: {message.text}")

    def _on_response(self, response) -> None:
        self.responses.append((response.status, urllib.parse.unquote(response.url)))
        if response.status >= 400:
            self.errors.append(f"HTTP {response.status}: {response.url}")

    # ------------------------------------------------------------------------- the app
    def open(self, timeout_ms: int = 120_000) -> None:
        """Load the frontend and wait until its app and graph exist and its Vue app is ready."""
        self.page.goto(self.url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.vueAppReady",
                                    timeout=timeout_ms)

    def evaluate(self, script: str, arg: Any = None) -> Any:
        return self.page.evaluate(script, arg)

    def command(self, command_id: str) -> None:
        """Run a frontend command by id, as its menu entry or key binding does."""
        self.evaluate("(id) => app.extensionManager.command.execute(id)", command_id)

    # ------------------------------------------------------------------------- templates
    def open_templates(self, timeout_ms: int = 120_000) -> None:
        """Show the template browser (a first-time visitor already sees it; open it otherwise)."""
        dialog = self.page.locator(TEMPLATE_DIALOG).first
        if not dialog.is_visible():
            self.command("Comfy.BrowseTemplates")
        dialog.wait_for(state="visible", timeout=timeout_ms)

    def wait_for_first_visit_templates(self, timeout_ms: int = 60_000) -> bool:
        """Wait for the template browser a new user gets on the first visit; False if it never came."""
        try:
            self.page.locator(TEMPLATE_DIALOG).first.wait_for(state="visible", timeout=timeout_ms)
            return True
        except Exception:  # playwright's TimeoutError: the caller opens the browser itself
            return False

    def select_template_category(self, label: str) -> None:
        """Click a category in the template browser's left panel (a node pack's is under Extensions)."""
        dialog = self.page.locator(TEMPLATE_DIALOG).first
        dialog.get_by_text(label, exact=True).first.click()
        dialog.locator("[data-testid^='template-workflow-']").first.wait_for(state="visible")

    def template_cards(self) -> list[dict]:
        """The template cards shown now: name, title, description and the thumbnail as loaded.

        Waits until every card's image has finished loading (or failed), so ``thumbnail_width`` is
        0 only for a thumbnail the server did not have. ``thumbnail`` is the image's ``src``: the
        frontend caches thumbnails and shows them as ``blob:`` URLs, so which file it fetched is
        in ``responses``.
        """
        cards = "[...document.querySelectorAll(\"" + TEMPLATE_DIALOG + " [data-testid^='template-workflow-']\")]"
        self.page.wait_for_function(
            f"{cards}.length > 0 && {cards}.every(c => [...c.querySelectorAll('img')]"
            ".every(i => i.complete) && c.querySelector('img'))", timeout=UI_TIMEOUT_MS)
        return self.evaluate(f"""() => {cards}.map(card => {{
            const img = card.querySelector('img');
            return {{name: card.dataset.testid.slice('template-workflow-'.length),
                     title: card.querySelector('h3')?.textContent.trim() ?? '',
                     description: card.querySelector('p')?.textContent.trim() ?? '',
                     thumbnail: img?.getAttribute('src') ?? '', thumbnail_width: img?.naturalWidth ?? 0}};
        }})""")

    def load_template(self, name: str, node_ids: list[int], timeout_ms: int = 180_000) -> None:
        """Click a template's card (the frontend fetches its JSON and calls ``app.loadGraphData``)
        and wait until the graph holds exactly the nodes ``node_ids`` (compared as numbers: frontend 1.49
        keeps node ids as strings)."""
        dialog = self.page.locator(TEMPLATE_DIALOG).first
        dialog.locator(f"[data-testid='template-workflow-{name}']").click()
        dialog.wait_for(state="hidden", timeout=timeout_ms)
        self.page.wait_for_function(
            "(ids) => JSON.stringify(app.graph._nodes.map(n => Number(n.id)).sort((a, b) => a - b)) === JSON.stringify(ids)",
            arg=sorted(node_ids), timeout=timeout_ms)

    def screenshot(self, path: str | os.PathLike) -> None:
        """A screenshot of the whole page (dialogs, menus and canvas) as the user sees it."""
        self.page.screenshot(path=str(path))

    # ------------------------------------------------------------------------- the graph
    def graph_nodes(self) -> list[dict]:
        """Every node of the loaded graph: id (a number; frontend 1.49 keeps node ids as strings), type,
        title, whether its type is registered, whether the frontend flagged it, and its bounding box
        (title bar included) as the frontend sized it."""
        return self.evaluate("""() => app.graph._nodes.map(n => {
            const b = n.getBounding();
            return {id: Number(n.id), type: n.type, title: n.title, registered: !!LiteGraph.registered_node_types[n.type],
                    has_errors: !!n.has_errors, x: b[0], y: b[1], width: b[2], height: b[3]};
        })""")

    def node_boxes(self) -> list[NodeBox]:
        return [NodeBox(n["id"], n["type"], n["title"], n["x"], n["y"], n["width"], n["height"])
                for n in self.graph_nodes()]

    def capture_graph(self, path: str | os.PathLike) -> None:
        """Fit the whole graph into the view and save a screenshot of the page (PNG)."""
        self.command("Comfy.Canvas.FitView")
        self.evaluate("""async () => {
            await new Promise(r => setTimeout(r, 500));     // FitView animates; let it settle
            app.canvas.draw(true, true);
            await new Promise(r => requestAnimationFrame(r));
        }""")
        self.screenshot(path)

    def graph_to_prompt(self) -> dict:
        """The API prompt the frontend would queue for the loaded graph (``app.graphToPrompt().output``)."""
        return self.evaluate("async () => (await app.graphToPrompt()).output")
