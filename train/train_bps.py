#!/usr/bin/env python
"""Train a Bayesian Power Steering adapter for SD1.5 or SDXL (see ``--help``).

    python train/train_bps.py --ckpt CHECKPOINT --data DATA_DIR --out ADAPTER.safetensors

This file only boots things in the right order, then hands over to ``train/loop.py``:

1. parse the command line (``--help`` works without ComfyUI);
2. find ComfyUI: the one this pack is installed in (``ComfyUI/custom_nodes/<pack>/``) or
   ``$COMFYUI_PATH``, and import it the way its ``main.py`` does (``--cpu`` without CUDA, its
   ``utils`` package before ``nodes``);
3. import this pack as a package under a fixed name. Never as top-level ``nodes``: that name
   is ComfyUI's own ``nodes.py``. The trainer then reaches ``bps`` and ``nodes.steering`` as
   ``<pack>.bps`` and ``<pack>.nodes.steering``, the very code the BPSApply node runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
#: Name the trainer imports the pack under (ComfyUI uses the folder name; any fixed name works).
PACK_MODULE = "comfyui_bps"


def load_standalone(module: str):
    """A module of train/ that imports nothing of the pack beyond train/ itself (the command lines),
    loaded without torch or ComfyUI, for ``--help`` and argument errors before ComfyUI boots.

    train/ is loaded as a package of its own so that such modules import their siblings.
    """
    package = f"{PACK_MODULE}_train_standalone"
    if package not in sys.modules:
        spec = importlib.util.spec_from_file_location(package, PACK_ROOT / "train" / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT / "train")])
        sys.modules[package] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.{module}")


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file()


def find_comfyui(pack_root: Path = PACK_ROOT) -> Path:
    """ComfyUI root: the one the pack is installed in, else $COMFYUI_PATH.

    Raises:
        SystemExit: neither exists, with how to fix it.
    """
    installed = pack_root.parent.parent
    if pack_root.parent.name == "custom_nodes" and _is_comfyui(installed):
        return installed
    env = os.environ.get("COMFYUI_PATH")
    if env and _is_comfyui(Path(env).expanduser()):
        return Path(env).expanduser().resolve()
    where = f"COMFYUI_PATH={env!r} is not a ComfyUI folder" if env else "COMFYUI_PATH is not set"
    raise SystemExit(
        f"error: cannot find ComfyUI. This pack is not inside ComfyUI/custom_nodes/ ({pack_root}) and {where}.\n"
        f"Fix: install the pack into ComfyUI/custom_nodes/, or run with COMFYUI_PATH=/path/to/ComfyUI, "
        f"using the Python environment ComfyUI runs in.")


def boot_comfyui(root: Path) -> None:
    """Import ComfyUI's modules as its main.py does, without parsing our command line."""
    import torch

    root_str = str(root)
    if root_str not in sys.path:
        sys.path.insert(0, root_str)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args as comfy_args
    local_rank = os.environ.get("LOCAL_RANK")
    if torch.cuda.is_available():
        if local_rank is not None:  # torchrun: one GPU per process, chosen before ComfyUI picks a device
            torch.cuda.set_device(int(local_rank))
    else:
        comfy_args.cpu = True
    import utils.extra_config  # noqa: F401  ComfyUI's top-level utils, before nodes.py shadows it
    import comfy.model_management  # noqa: F401
    import nodes  # noqa: F401  ComfyUI's nodes.py (not ours)


def import_pack(pack_root: Path = PACK_ROOT, name: str = PACK_MODULE) -> types.ModuleType:
    """Import the pack root as package ``name`` (runs its __init__ like ComfyUI does)."""
    if name in sys.modules:
        return sys.modules[name]
    init = pack_root / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(pack_root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    else:  # a checkout without the node registration: the subpackages still import
        module = types.ModuleType(name)
        module.__path__ = [str(pack_root)]
        sys.modules[name] = module
    return module


def _setup_logging() -> None:
    # Our own handler: ComfyUI's imports already configured the root logger (WARNING level).
    logger = logging.getLogger("bps.train")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[BPS train %(asctime)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None, **run_kwargs) -> int:
    """Command-line entry; returns the exit code (0 done, 1 error, 130 interrupted)."""
    args = load_standalone("cli").parse_args(argv)
    _setup_logging()
    boot_comfyui(find_comfyui())
    pack = import_pack()
    loop = importlib.import_module(f"{pack.__name__}.train.loop")
    dataset = importlib.import_module(f"{pack.__name__}.train.dataset")
    base_model = importlib.import_module(f"{pack.__name__}.train.base_model")
    known = (loop.TrainError, dataset.DataError, base_model.BaseModelError)
    try:
        result = loop.run(args, **run_kwargs)
    except known as e:
        logging.getLogger("bps.train").error("error: %s", e)
        return 1
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
