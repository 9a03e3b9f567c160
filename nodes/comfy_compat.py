"""What differs between the ComfyUI versions this pack supports (0.8.0 up to 0.33.0 and later).

The one place of the pack that asks ComfyUI what it has: every other module calls these helpers
and stays the same on every version. Each helper feature-tests ComfyUI's public API (a field, an
attribute, a module) instead of comparing version numbers, so a ComfyUI between or after the tested
ones gets whatever it supports.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from comfy_api.latest import io

#: ``io.Schema(search_aliases=...)``: extra words the node search matches (in 0.33.0, not in 0.8.0).
SCHEMA_HAS_SEARCH_ALIASES = any(f.name == "search_aliases" for f in dataclasses.fields(io.Schema))


def search_aliases(aliases: Sequence[str]) -> dict:
    """Keyword arguments for ``io.Schema`` that give the node these search aliases where the V3
    API has them (``io.Schema(..., **search_aliases([...]))``), and nothing on older ComfyUI, whose
    Schema refuses the keyword."""
    return {"search_aliases": list(aliases)} if SCHEMA_HAS_SEARCH_ALIASES else {}
