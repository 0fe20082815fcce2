"""Generate samples in batches into a folder of PNGs with a manifest; a re-run resumes.

Each sample is seeded by its index, so a sample is the same image whichever batch, shard or
resumed run makes it. PNGs and the manifest are written atomically as each batch finishes: an
interrupted run leaves only complete files, and the next run skips them.

Several ranks share a folder: each makes every world-size-th sample and keeps its own manifest
(one writer per file); a sample counts as finished when any manifest lists it and its PNG exists
and decodes, so a resumed run may use another number of ranks.

Every manifest holds a fingerprint of what its samples were made with (seed, steps, guidance,
fastattn's version, and what the caller adds: plan, model, solver) and each sample's condition and
pipeline seconds. A resumed run whose settings differ is refused (:func:`folder_mismatch`): file
names alone never decide that a sample is the one asked for.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
from PIL import Image

import fastattn
from fastattn.utils.io import atomic_save_image, atomic_write_json, remove_orphaned_temporaries

from ..infra.app import ConfigError
from ..infra.conditions import Conditions, to_device
from ..infra.progress import step_progress
from ..infra.timing import Stopwatch

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def sample_name(index: int) -> str:
    return f"{index:06d}.png"


def manifest_name(rank: int, world_size: int) -> str:
    return MANIFEST if world_size == 1 else f"manifest.rank{rank}.json"


def load_manifest(folder: Path, name: str = MANIFEST) -> dict:
    path = folder / name
    if not path.exists():
        return {"samples": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt manifest ({e}); delete it to regenerate the folder") from None
    if not isinstance(manifest.get("samples"), dict):
        raise ValueError(f"{path}: corrupt manifest (no 'samples' object); delete it to regenerate the folder")
    return manifest


def all_manifests(folder: Path) -> dict[str, dict]:
    """Every manifest of the folder (one per rank that wrote there), by file name."""
    return {path.name: load_manifest(folder, path.name) for path in sorted(Path(folder).glob("manifest*.json"))}


def finished(folder: Path, manifest: dict | None = None) -> set[int]:
    """Indices whose PNG exists and is recorded in ``manifest`` (default: in any manifest of the folder)."""
    manifests = [manifest] if manifest is not None else all_manifests(folder).values()
    return {int(i) for m in manifests for i in m["samples"] if (folder / sample_name(int(i))).exists()}


def generate(pipe, conditions: Conditions, indices: Sequence[int], folder: str | Path, *, seed: int, num_steps: int,
             guidance_scale: float, batch_size: int, device: torch.device, desc: str = "generate",
             rank: int = 0, world_size: int = 1, call_context: Callable[[], ContextManager] | None = None,
             fingerprint: dict | None = None, writes: bool = True) -> dict:
    """Write sample ``i`` of this rank's share of ``indices`` to ``folder/{i:06d}.png``, skipping
    finished ones. The share is every ``world_size``-th index from ``rank`` on.

    ``call_context()``, when given, is entered around each pipeline call (cache hooks' context and reset).
    ``fingerprint`` adds the caller's fields (plan, model, ...) to :func:`core_fingerprint`; a folder
    whose samples were made with other values is refused (ConfigError) before any generation.
    ``writes=False``: this process computes the share's batches beside the one that writes them (a
    context-parallel group's other members, whose collectives the writer's pipeline calls need).

    Returns ``{"generated": n, "skipped": n, "seconds": pipeline seconds of the generated ones}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if world_size == 1 and writes:  # ranks share the folder: their caller clears it before any rank writes
        remove_orphaned_temporaries(folder)
    record = core_fingerprint(seed, num_steps, guidance_scale) | (fingerprint or {})
    mismatch = folder_mismatch(folder, record, conditions, seed)
    if mismatch:
        raise ConfigError(f"{folder}: {mismatch}; run into a new folder or delete this one")
    name = manifest_name(rank, world_size)
    manifest = load_manifest(folder, name) | {"fingerprint": record}
    share = list(indices)[rank::world_size]
    done = decoded(folder, finished(folder) & set(share))
    todo = [i for i in share if i not in done]
    pipeline_time = Stopwatch(device, "wall")
    # The writer's first file comes after its first pipeline call, which waits for every member of its
    # group: all have chosen ``todo`` from the same folder by then.
    with torch.no_grad(), step_progress(pipe, len(todo), desc, "samples", enabled=rank == 0 and writes) as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            progress.generation(len(batch))
            inputs = conditions.inputs(batch, seed, num_steps, guidance_scale)
            before = pipeline_time.ms()
            pipeline_time.start()
            with call_context() if call_context is not None else nullcontext():
                images = pipe(**to_device(inputs, device)).images
            pipeline_time.stop()
            seconds_each = (pipeline_time.ms() - before) / 1e3 / len(batch)
            if not writes:
                continue
            for index, image in zip(batch, np.asarray(images), strict=True):
                atomic_save_image(folder / sample_name(index), Image.fromarray(to_uint8(image)))
                manifest["samples"][str(index)] = {"file": sample_name(index), "seed": seed + index,
                                                   "condition": condition_record(conditions, index, seed),
                                                   "seconds": seconds_each}
                if not np.isfinite(image).all():  # saved black: the evaluate stage must not score it
                    manifest["samples"][str(index)]["nonfinite"] = True
            atomic_write_json(folder / name, manifest)
    return {"generated": len(todo), "skipped": len(share) - len(todo), "seconds": pipeline_time.ms() / 1e3}


def core_fingerprint(seed: int, num_steps: int, guidance_scale: float) -> dict:
    """What every sample folder's images depend on, whoever makes them."""
    return {"seed": int(seed), "num_steps": int(num_steps), "guidance_scale": float(guidance_scale),
            "fastattn_version": fastattn.__version__}


def condition_record(conditions: Conditions, index: int, seed: int):
    """What sample ``index`` is conditioned on, as its manifest records it: a class label, a prompt,
    or (tiny text models) the seed of its embedding."""
    if conditions.model.family == "dit":
        return conditions.label(index, seed)
    return conditions.prompt(index) or f"embedding:{seed + index}"


def folder_mismatch(folder: Path, fingerprint: dict, conditions: Conditions, seed: int) -> str | None:
    """Why ``folder``'s recorded samples are not the ones ``fingerprint`` and ``conditions`` make,
    in one line naming the fields that differ; None when they are (or there are none)."""
    manifests = [m for m in all_manifests(folder).values() if m["samples"]]
    if not manifests:
        return None
    count = len({i for m in manifests for i in m["samples"]})
    if any("fingerprint" not in m for m in manifests):
        return (f"{count} samples made before fingerprints were recorded (their settings are unknown, "
                "so they cannot be resumed)")
    differ = {}
    for manifest in manifests:
        old = manifest["fingerprint"]
        differ |= {k: (old.get(k), fingerprint.get(k)) for k in old.keys() | fingerprint.keys()
                   if old.get(k) != fingerprint.get(k)}
        differ |= _condition_mismatch(manifest["samples"], conditions, seed)
    if not differ:
        return None
    fields = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in sorted(differ.items()))
    return f"{count} samples made with other settings ({fields})"


def _condition_mismatch(samples: dict, conditions: Conditions, seed: int) -> dict:
    """The first recorded sample whose condition this run would not give it, as a field to report."""
    for key, entry in sorted(samples.items(), key=lambda item: int(item[0])):
        expected = condition_record(conditions, int(key), seed)
        if entry.get("condition") != expected:
            return {f"condition of sample {key}": (entry.get("condition"), expected)}
    return {}


def discard_samples(folder: Path) -> int:
    """Delete the folder's manifests and the sample files they list; how many samples went."""
    manifests = all_manifests(folder)
    entries = {i: e for m in manifests.values() for i, e in m["samples"].items()}
    for index in entries:  # named by index, never by a path read from the file
        (folder / sample_name(int(index))).unlink(missing_ok=True)
    for name in manifests:
        (folder / name).unlink()
    return len(entries)


def decoded(folder: Path, indices: set[int]) -> set[int]:
    """Those of ``indices`` whose PNG decodes whole; the others (truncated, corrupt) are logged and left out."""
    broken = sorted(i for i in indices if not _decodes(folder / sample_name(i)))
    if broken:
        log.warning("%s: %d finished sample(s) do not decode (first: %s): making them again",
                    folder, len(broken), sample_name(broken[0]))
    return indices - set(broken)


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):  # what PIL raises for truncated or corrupt files
        return False


def recorded_totals(folder: Path, indices: Sequence[int]) -> dict:
    """Samples of ``indices`` the folder's manifests record, and their pipeline seconds, over every
    run that made them (a resumed run's own counts cover only what it made)."""
    entries = {int(i): e for m in all_manifests(folder).values() for i, e in m["samples"].items()}
    wanted = [entries[i] for i in indices if i in entries]
    return {"total_generated": len(wanted), "total_seconds": sum(e.get("seconds", 0.0) for e in wanted)}


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def sample_array(folder: str | Path, indices: Sequence[int]):
    """The samples ``indices`` of a folder as a lazy [N, H, W, 3] uint8 array."""
    from ..metrics.folder import ImageFolderArray

    folder = Path(folder)
    missing = [i for i in indices if not (folder / sample_name(i)).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} samples missing (first: {sample_name(missing[0])})")
    return ImageFolderArray([folder / sample_name(i) for i in indices])
