"""Find the condition/target pairs and their captions in a data folder, and check them all.

Two layouts are understood:

* official (BPS / ControlNet release): ``source/``, ``target/`` and one JSON or JSON-lines file
  whose records pair ``source``, ``target`` and ``prompt`` (a string or a list of captions);
  paths are relative to the data folder (``"source/0.png"``) or to source/ and target/ (``"0.png"``).
* plain: the same file names (extension may differ) in ``source/`` and ``target/``; captions in
  ``<name>.txt`` next to the target or in ``captions/``, or one shared ``--prompt``.

With ``--condition KIND`` the conditions are made from the targets (see bps/condition_maps.py):
the folder needs only ``target/`` and captions (or a JSON file whose records name ``target`` and
``prompt``); a pair's ``source`` is then None.

Style adapters also read an extra map per pair from ``extra/`` (same name as the source, or the
record's ``"extra"`` entry); 24-channel adapters read ``source/NAME.npy`` arrays instead of images
(see :mod:`train.hint_layout`).

Every problem (missing file, unreadable or corrupt image, source/target size mismatch, empty
caption, broken JSON record) is collected and reported in one go, before any model is loaded.
No torch, no ComfyUI.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .hint_layout import EXTRA_FOLDER, LATENT_FACTOR, MAP_SUFFIX, HintLayout
from .images import IMAGE_SUFFIXES, ImageReadError, image_size
from .latent_maps import MapReadError, map_size


@dataclass(frozen=True)
class Pair:
    """One training example: condition image, target image and its captions."""

    name: str                  # how reports name it, e.g. "target/07.png" or "prompt.json line 8"
    source: Path | None        # None: the condition is made from the target (--condition)
    target: Path
    prompts: tuple[str, ...]
    extra: Path | None = None  # a style adapter's extra map


@dataclass(frozen=True)
class Problem:
    """One bad entry of the data folder."""

    entry: str
    problem: str

    def __str__(self) -> str:
        return f"{self.entry}: {self.problem}"


class DataError(ValueError):
    """The data folder has problems; ``problems`` lists every one of them."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


def _is_image(path: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> bool:
    return path.is_file() and path.suffix.lower() in suffixes


def _source_suffixes(hint: HintLayout) -> tuple[str, ...]:
    return (MAP_SUFFIX,) if hint.latent_map else IMAGE_SUFFIXES


def _extra_for(data_dir: Path, source: Path, declared: str | None = None) -> tuple[Path | None, str | None]:
    """A style pair's extra map (the record's entry, else extra/<source name>.*), or (None, problem)."""
    if declared:
        found = _resolve(data_dir, declared, EXTRA_FOLDER)
        if found is None:
            return None, f"extra map not found: {declared} (looked in {data_dir} and {data_dir / EXTRA_FOLDER})"
        return found, None
    folder = data_dir / EXTRA_FOLDER
    matches = sorted(p for p in folder.glob(f"{source.stem}.*") if _is_image(p)) if folder.is_dir() else []
    if not matches:
        return None, (f"no extra map {EXTRA_FOLDER}/{source.stem}.* for it (style adapters take one grey extra "
                      f"map per condition image, the same size)")
    return matches[0], None


def _clean_caption(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------- official layout

def _json_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.iterdir() if p.is_file() and p.suffix.lower() in (".json", ".jsonl"))


def _read_records(path: Path) -> tuple[list[tuple[str, object]], list[Problem]]:
    """Records of a JSON array file or a JSON-lines file, each with its location for reports."""
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return [], [Problem(path.name, f"invalid JSON at line {e.lineno}: {e.msg}")]
        return [(f"{path.name} record {i}", rec) for i, rec in enumerate(data)], []
    records, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {lineno}"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(where, f"invalid JSON ({e.msg}); each line must be one "
                                           f'{{"source": ..., "target": ..., "prompt": ...}} object'))
    return records, problems


def _resolve(data_dir: Path, value: str, folder: str) -> Path | None:
    raw = Path(value)
    candidates = [raw] if raw.is_absolute() else [data_dir / raw, data_dir / folder / raw]
    for c in candidates:
        if c.is_file():
            return c
    return None


def _official_pairs(data_dir: Path, json_path: Path, prompt: str | None,
                    hint: HintLayout, from_targets: str | None = None) -> tuple[list[Pair], list[Problem]]:
    records, problems = _read_records(json_path)
    pairs = []
    files = ("target",) if from_targets else ("source", "target")
    for where, rec in records:
        if not isinstance(rec, dict):
            problems.append(Problem(where, "record is not a JSON object"))
            continue
        if from_targets and rec.get("source"):
            problems.append(Problem(where, f"names a source, but --condition {from_targets} makes the conditions "
                                           f"from the targets; remove the record's \"source\" or leave --condition "
                                           f"out to train on the sources"))
            continue
        missing = [k for k in files if not isinstance(rec.get(k), str) or not rec.get(k)]
        if missing:
            problems.append(Problem(where, f"missing {' and '.join(repr(k) for k in missing)}"))
            continue
        bad = False
        paths = {"source": None}
        for key in files:
            folder = key
            found = _resolve(data_dir, rec[key], folder)
            if found is None:
                problems.append(Problem(where, f"{key} file not found: {rec[key]} (looked in {data_dir} "
                                               f"and {data_dir / folder})"))
                bad = True
            paths[key] = found
        raw_prompt = rec.get("prompt", rec.get("prompts"))
        captions = [raw_prompt] if isinstance(raw_prompt, str) else raw_prompt
        if captions is None and prompt:
            captions = [prompt]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            problems.append(Problem(where, 'missing "prompt" (a string or a list of strings)'))
            continue
        captions = [_clean_caption(c) for c in captions if _clean_caption(c)]
        if not captions:
            problems.append(Problem(where, "empty prompt"))
            continue
        extra = None
        if hint.extra_map and paths["source"] is not None:
            extra, problem = _extra_for(data_dir, paths["source"], rec.get("extra"))
            if problem:
                problems.append(Problem(where, problem))
                bad = True
        if not bad:
            pairs.append(Pair(where, paths["source"], paths["target"], tuple(captions), extra))
    return pairs, problems


# -------------------------------------------------------------------------------- plain layout

def _by_stem(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> tuple[dict[str, Path], list[Problem]]:
    found: dict[str, Path] = {}
    problems = []
    for p in sorted(folder.iterdir()):
        if not _is_image(p, suffixes):
            continue
        if p.stem in found:
            problems.append(Problem(f"{folder.name}/{p.name}", f"two images named {p.stem!r} "
                                                               f"({found[p.stem].name} and {p.name}); keep one"))
            continue
        found[p.stem] = p
    return found, problems


def _caption_for(data_dir: Path, target: Path, prompt: str | None) -> tuple[tuple[str, ...] | None, str | None]:
    """Captions of one target, or (None, problem)."""
    for txt in (target.with_suffix(".txt"), data_dir / "captions" / f"{target.stem}.txt"):
        if txt.is_file():
            text = _clean_caption(txt.read_text(encoding="utf-8-sig", errors="replace"))
            if not text:
                return None, f"caption file {txt.relative_to(data_dir)} is empty"
            return (text,), None
    if prompt:
        return (prompt,), None
    return None, (f"no caption: add target/{target.stem}.txt or captions/{target.stem}.txt, "
                  f"or give one prompt for all pairs with --prompt")


def _plain_pairs(data_dir: Path, prompt: str | None, hint: HintLayout,
                 from_targets: str | None = None) -> tuple[list[Pair], list[Problem]]:
    sources, problems = ({}, []) if from_targets else _by_stem(data_dir / "source", _source_suffixes(hint))
    targets, more = _by_stem(data_dir / "target")
    problems += more
    pairs = []
    for stem, target in targets.items():
        name = f"target/{target.name}"
        source = sources.get(stem)
        if source is None and not from_targets:
            what = f"condition map source/{stem}{MAP_SUFFIX}" if hint.latent_map else f"condition image source/{stem}.*"
            problems.append(Problem(name, f"no {what} for it"))
            continue
        captions, problem = _caption_for(data_dir, target, prompt)
        if problem:
            problems.append(Problem(name, problem))
            continue
        extra = None
        if hint.extra_map:
            extra, problem = _extra_for(data_dir, source)
            if problem:
                problems.append(Problem(name, problem))
                continue
        pairs.append(Pair(name, source, target, captions, extra))
    for stem, source in sources.items():
        if stem not in targets:
            problems.append(Problem(f"source/{source.name}", f"no target image target/{stem}.* for it"))
    return pairs, problems


# ------------------------------------------------------------------------------------ checks

def find_pairs(data_dir: str | Path, *, prompt: str | None = None, hint: HintLayout = HintLayout(),
               from_targets: str | None = None) -> tuple[list[Pair], list[Problem]]:
    """List the pairs of a data folder (either layout) without opening any image.

    ``hint`` says what the condition files are (images, images plus extra maps, or ``.npy`` maps).
    ``from_targets`` (a ``--condition`` kind such as "sketch") means there are no condition files:
    the conditions will be made from the targets, and a ``source/`` folder is refused as ambiguous.

    Returns the pairs whose files and captions were found, and the problems of the others.

    Raises:
        DataError: the folder itself is unusable (missing, no source/ or target/, several JSON files).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"training data folder {data_dir} does not exist; pass --data DIR with source/ and "
                        f"target/ folders (or leave --data out to train on the built-in demo set)")
    prompt = _clean_caption(prompt) if prompt else None
    json_files = _json_files(data_dir)
    if len(json_files) > 1:
        names = ", ".join(p.name for p in json_files)
        raise DataError(f"{data_dir} has several JSON files ({names}); keep exactly one file pairing "
                        f"source, target and prompt")
    if json_files:
        return _official_pairs(data_dir, json_files[0], prompt, hint, from_targets)
    if from_targets:
        if not (data_dir / "target").is_dir():
            raise DataError(f"{data_dir} has no target/ folder; --condition {from_targets} makes the conditions "
                            f"from the images in target/ (captions as target/NAME.txt, captions/NAME.txt or "
                            f"--prompt)")
        if (data_dir / "source").is_dir():
            raise DataError(f"{data_dir} has a source/ folder, but --condition {from_targets} makes the "
                            f"conditions from target/; leave --condition out to train on source/, or move "
                            f"source/ away to train on {from_targets} conditions made from the targets")
        return _plain_pairs(data_dir, prompt, hint, from_targets)
    missing = [d for d in ("source", "target") if not (data_dir / d).is_dir()]
    if missing:
        alone = (" Only images? Pass --condition sketch (or edges, layout) to make the conditions from "
                 "target/." if missing == ["source"] else "")
        raise DataError(f"{data_dir} has no {' and no '.join(d + '/' for d in missing)} folder; put the "
                        f"condition images in source/ and the images to learn in target/ (same file names), "
                        f"plus captions as target/NAME.txt or a JSON file pairing them.{alone}")
    return _plain_pairs(data_dir, prompt, hint)


def _check_pair(pair: Pair, hint: HintLayout = HintLayout()) -> Problem | None:
    sizes = {}
    files = ([("condition", pair.source)] if pair.source else []) + [("target", pair.target)] + \
        ([("extra", pair.extra)] if pair.extra else [])
    for role, path in files:
        try:
            if role == "condition" and hint.latent_map:
                sizes[role] = map_size(path, hint.channels)
            else:
                sizes[role] = image_size(path)
        except (ImageReadError, MapReadError, OSError) as e:
            detail = str(e).split(": ", 1)[-1] if isinstance(e, (ImageReadError, MapReadError)) \
                else e.strerror or str(e)
            kind = "map" if role == "condition" and hint.latent_map else "image"
            return Problem(pair.name, f"{role} {kind} {path.name} is unreadable: {detail}")
    if pair.source is None:  # the condition will be made from the target: same size by construction
        return None
    (sh, sw), (th, tw) = sizes["condition"], sizes["target"]
    if hint.latent_map:
        # at latent resolution: 1/8 of the target, rounded either way for sides that are not multiples of 8
        if sh not in (th // LATENT_FACTOR, -(-th // LATENT_FACTOR)) or sw not in (tw // LATENT_FACTOR,
                                                                                   -(-tw // LATENT_FACTOR)):
            return Problem(pair.name, f"condition map {pair.source.name} is {sw}x{sh} but target {pair.target.name} "
                                      f"is {tw}x{th}; a {hint.channels}-channel map is at latent resolution, so it "
                                      f"must be {tw // LATENT_FACTOR}x{th // LATENT_FACTOR}")
    elif (sh, sw) != (th, tw):
        return Problem(pair.name, f"condition image {pair.source.name} is {sw}x{sh} but target "
                                  f"{pair.target.name} is {tw}x{th}; they must be the same size")
    if pair.extra and sizes["extra"] != sizes["condition"]:
        (eh, ew) = sizes["extra"]
        return Problem(pair.name, f"extra map {pair.extra.name} is {ew}x{eh} but condition image "
                                  f"{pair.source.name} is {sw}x{sh}; they must be the same size")
    return None


def check_images(pairs: list[Pair], workers: int = 4,
                 hint: HintLayout = HintLayout()) -> tuple[list[Pair], list[Problem]]:
    """Decode every image and map (catching corrupt files) and compare their sizes."""
    with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2 decodes without holding the GIL
        results = list(pool.map(lambda p: _check_pair(p, hint), pairs))
    good = [p for p, r in zip(pairs, results) if r is None]
    return good, [r for r in results if r is not None]


def load_pairs(data_dir: str | Path, *, prompt: str | None = None, skip_bad: bool = False,
               workers: int = 4, hint: HintLayout = HintLayout(),
               from_targets: str | None = None) -> tuple[list[Pair], list[Problem]]:
    """Find and check all pairs; report every problem at once.

    ``hint`` says what the condition files are (see :mod:`train.hint_layout`); ``from_targets``
    (a ``--condition`` kind) that there are none: the conditions are made from the targets.

    Returns:
        The usable pairs and the problems that were skipped (only with ``skip_bad``).

    Raises:
        DataError: any problem and not ``skip_bad`` (the message lists all of them), or no usable
            pair at all.
    """
    pairs, problems = find_pairs(data_dir, prompt=prompt, hint=hint, from_targets=from_targets)
    pairs, image_problems = check_images(pairs, workers, hint)
    problems += image_problems
    listed = len(pairs) + len(problems)
    if problems and not skip_bad:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"found {len(problems)} problem(s) in training data {data_dir} "
                        f"({len(pairs)} of {listed} entries usable):\n{lines}\n"
                        f"Fix or remove these entries, or pass --skip-bad to train on the "
                        f"{len(pairs)} usable pair(s).", problems)
    if not pairs:
        raise DataError(f"no usable training pairs in {data_dir}" +
                        (f" ({len(problems)} bad entries skipped)" if problems else "") +
                        "; see the layouts in `python train/train_bps.py --help`", problems)
    return pairs, problems
