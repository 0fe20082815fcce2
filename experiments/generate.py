"""Generate samples in batches into a folder of PNGs with a manifest; a re-run resumes.

Each sample is seeded by its index, so a sample is the same image whichever batch, shard or
resumed run makes it. PNGs and the manifest are written atomically as each batch finishes: an
interrupted run leaves only complete files, and the next run skips them.

Several ranks share a folder: each makes every world-size-th sample and keeps its own manifest
(one writer per file); a sample counts as finished when any manifest lists it and its PNG exists,
so a resumed run may use another number of ranks.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
from PIL import Image

from fastattn.utils.io import atomic_save_image, atomic_write_json

from .conditions import Conditions, to_device
from .progress import step_progress
from .timing import Stopwatch

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


def finished(folder: Path, manifest: dict | None = None) -> set[int]:
    """Indices whose PNG exists and is recorded in ``manifest`` (default: in any manifest of the folder)."""
    manifests = [manifest] if manifest is not None else [
        load_manifest(folder, path.name) for path in sorted(folder.glob("manifest*.json"))]
    return {int(i) for m in manifests for i in m["samples"] if (folder / sample_name(int(i))).exists()}


def generate(pipe, conditions: Conditions, indices: Sequence[int], folder: str | Path, *, seed: int, num_steps: int,
             guidance_scale: float, batch_size: int, device: torch.device, desc: str = "generate",
             rank: int = 0, world_size: int = 1, call_context: Callable[[], ContextManager] | None = None) -> dict:
    """Write sample ``i`` of this rank's share of ``indices`` to ``folder/{i:06d}.png``, skipping
    finished ones. The share is every ``world_size``-th index from ``rank`` on.

    ``call_context()``, when given, is entered around each pipeline call (cache hooks' context and reset).

    Returns ``{"generated": n, "skipped": n, "seconds": pipeline seconds of the generated ones}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = manifest_name(rank, world_size)
    manifest = load_manifest(folder, name)
    done = finished(folder)
    share = list(indices)[rank::world_size]
    todo = [i for i in share if i not in done]
    pipeline_time = Stopwatch(device, "wall")
    with torch.no_grad(), step_progress(pipe, len(todo), desc, "samples", enabled=rank == 0) as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            progress.generation(len(batch))
            inputs = conditions.inputs(batch, seed, num_steps, guidance_scale)
            pipeline_time.start()
            with call_context() if call_context is not None else nullcontext():
                images = pipe(**to_device(inputs, device)).images
            pipeline_time.stop()
            for k, (index, image) in enumerate(zip(batch, np.asarray(images), strict=True)):
                atomic_save_image(folder / sample_name(index), Image.fromarray(to_uint8(image)))
                condition = (inputs["class_labels"][k] if "class_labels" in inputs
                             else conditions.prompt(index) or f"embedding:{seed + index}")
                manifest["samples"][str(index)] = {"file": sample_name(index), "seed": seed + index,
                                                   "condition": condition}
                if not np.isfinite(image).all():  # saved black: the evaluate stage must not score it
                    manifest["samples"][str(index)]["nonfinite"] = True
            atomic_write_json(folder / name, manifest)
    return {"generated": len(todo), "skipped": len(share) - len(todo), "seconds": pipeline_time.ms() / 1e3}


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def sample_array(folder: str | Path, indices: Sequence[int]):
    """The samples ``indices`` of a folder as a lazy [N, H, W, 3] uint8 array."""
    from .metrics.folder import ImageFolderArray

    folder = Path(folder)
    missing = [i for i in indices if not (folder / sample_name(i)).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} samples missing (first: {sample_name(missing[0])})")
    return ImageFolderArray([folder / sample_name(i) for i in indices])
