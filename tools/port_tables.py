"""Print the README's port tables, generated from the port rule (bps/ports.py).

    python tools/port_tables.py          # the markdown the README's "The ports" section holds

tests/test_example_files.py checks that the README holds exactly this text, so the tables cannot
drift from the rule that steering, training and the schedules use.
"""

from __future__ import annotations

import sys
from itertools import groupby
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bps.ports import PortMap, port_map  # noqa: E402
from bps.unet_shape import SD15_SHAPE, SDXL_SHAPE  # noqa: E402


def _numbers(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 2 else f"{names[0]}..{names[-1].rsplit('_', 1)[-1]}"


def port_table(ports: PortMap) -> str:
    """Markdown table of one UNet's ports, one row per run of ports alike in group, width, scale and weight."""
    rows = ["| ports | UNet block | channels | resolution | additions per port | default omega |",
            "| --- | --- | --- | --- | --- | --- |"]
    key = lambda p: (p.group, p.channels, p.downsample, p.default_omega, p.sublayers)  # noqa: E731
    for (group, channels, down, omega, sub), run in groupby(ports, key=key):
        run = list(run)
        names = [p.name for p in run]
        blocks = "middle_block" if group == "middle" else \
            f"{run[0].module_path.split('.')[0]} {_numbers([str(p.block[1]) for p in run])}"
        res = "h x w" if down == 1 else f"h/{down}"
        rows.append(f"| {_numbers(names)} | {blocks} | {channels} | {res} | {sub} | {omega:g} |")
    return "\n".join(rows)


def readme_section() -> str:
    """The generated part of the README's port section: SD1.5's table, then SDXL's."""
    sd15, sdxl = port_map(SD15_SHAPE), port_map(SDXL_SHAPE)
    return (f"SD1.5: {len(sd15)} ports, {sd15.additions} additions per UNet call\n\n{port_table(sd15)}\n\n"
            f"SDXL: {len(sdxl)} ports, {sdxl.additions} additions per UNet call\n\n{port_table(sdxl)}\n")


if __name__ == "__main__":
    print(readme_section(), end="")
