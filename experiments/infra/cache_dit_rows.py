"""cache-dit's block caches (DBCache, DBPrune) as rows of the comparison, driven as cache-dit says.

cache-dit (``pip install 'fastattn[peers]'``) is optional: a row ``{kind: cache_dit, ...}`` names it
and is refused in one line when it is missing. What it needs on the models fastattn compares:

* the block layout, given as cache-dit's ``BlockAdapter`` for a model it is handed explicitly: the
  transformer's block list (the fastattn adapter names it) and ``ForwardPattern.Pattern_3`` (DiT's
  and PixArt's ``BasicTransformerBlock`` takes and returns the image tokens only); the CFG halves
  run in one batch (``enable_separate_cfg=False``). DiTTransformer2DModel's forward calls block 0's
  embedding after the loop, which cache-dit's wrapped block list cannot give, so DiT also takes
  cache-dit's own ``DiTPatchFunctor`` (a forward that keeps that embedding aside);
* a fresh context per generation: cache-dit wraps the pipeline's ``__call__`` and resets its context
  at every call, so each batch of samples starts from nothing;
* removal after the row: ``cache_dit.disable_cache``, then what it leaves behind is undone (the
  patch functor's forward, its marker and the embedding it registered as a submodule, the block
  list moved last among the submodules), so the transformer's forward is its class's again.
* stacked with a fastattn plan (``stacked:`` rows): fastattn sees cache-dit's ``_is_cached`` flag
  (:func:`fastattn.features.block_caches.block_cache_installed`) and handles the middle blocks'
  cached steps as it does diffusers' block caches'.

Compute is not read from cache-dit: the blocks cache-dit calls are counted by
:class:`~experiments.infra.block_flops.BlockFlopCounter` as for every row; :meth:`CacheDitRow.cached_steps`
gives cache-dit's own account of the last generation to check it by.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager
from typing import Any, Iterator

from fastattn.models import get_adapter
from fastattn.utils.paths import slug

INSTALL = "pip install 'fastattn[peers]'"
CACHES = {"dbcache": "DBCache", "dbprune": "DBPrune"}
CALIBRATORS = {"none": "", "taylorseer": "TaylorSeer", "foca": "FoCa"}
MASK_POLICIES = ("slow", "medium", "fast", "ultra")  # cache-dit's predefined steps masks (SCM)
# Each key and its default (cache-dit's own, except the calibrator: none); the label shows the first
# group always and the rest where changed.
DEFAULTS: dict[str, Any] = {
    "cache": "dbcache", "Fn": 1, "Bn": 0, "threshold": 0.08, "warmup": 8,
    "max_cached_steps": -1, "max_continuous_cached_steps": -1, "warmup_interval": 1,
    "calibrator": "none", "taylorseer_order": 1,
    "scm": None, "scm_policy": "dynamic",
    "non_prune_blocks": [], "dynamic_prune_threshold": False,
}
SHOWN = ("threshold", "warmup")
SHORT = {"threshold": "R", "warmup": "W", "max_cached_steps": "M", "max_continuous_cached_steps": "MC",
         "warmup_interval": "I", "taylorseer_order": "order", "scm_policy": "SCM policy"}
PRUNE_ONLY = ("non_prune_blocks", "dynamic_prune_threshold")


def installed() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


def check_spec(spec: dict, where: str) -> dict:
    """The setting with its defaults filled in; a ValueError naming ``where`` for a bad one, or for a
    missing cache-dit."""
    unknown = set(spec) - set(DEFAULTS) - {"kind"}
    if unknown:
        raise ValueError(f"{where}: cache_dit has no setting {sorted(unknown)[0]!r} (it takes {', '.join(DEFAULTS)})")
    full = {"kind": "cache_dit", **DEFAULTS, **{k: v for k, v in spec.items() if k != "kind"}}
    if full["cache"] not in CACHES:
        raise ValueError(f"{where}.cache must be one of {', '.join(CACHES)}, got {full['cache']!r}")
    if full["calibrator"] not in CALIBRATORS:
        raise ValueError(f"{where}.calibrator must be one of {', '.join(CALIBRATORS)}, got {full['calibrator']!r}")
    for key in ("Fn", "Bn", "warmup", "max_cached_steps", "max_continuous_cached_steps", "warmup_interval",
                "taylorseer_order"):
        low = 1 if key in ("warmup_interval", "taylorseer_order") else -1 if key.startswith("max_") else 0
        if isinstance(full[key], bool) or not isinstance(full[key], int) or full[key] < low:
            raise ValueError(f"{where}.{key} must be an integer >= {low}, got {full[key]!r}")
    if isinstance(full["threshold"], bool) or not isinstance(full["threshold"], (int, float)) or full["threshold"] < 0:
        raise ValueError(f"{where}.threshold must be a number >= 0, got {full['threshold']!r}")
    scm = full["scm"]
    if scm is not None and scm not in MASK_POLICIES and not _is_bins(scm):
        raise ValueError(f"{where}.scm must be one of {', '.join(MASK_POLICIES)} or [compute_bins, cache_bins] "
                         f"(lists of step counts), got {scm!r}")
    if full["scm_policy"] not in ("dynamic", "static"):
        raise ValueError(f"{where}.scm_policy must be dynamic or static, got {full['scm_policy']!r}")
    if full["cache"] != "dbprune" and any(full[k] != DEFAULTS[k] for k in PRUNE_ONLY):
        raise ValueError(f"{where}: {', '.join(PRUNE_ONLY)} are DBPrune's settings (cache: dbprune)")
    if not installed():
        raise ValueError(f"{where}: cache_dit rows need cache-dit: {INSTALL}")
    if full["cache"] == "dbprune" and not prune_runs_on_pattern_3():
        raise ValueError(f"{where}: cache-dit's DBPrune fails on blocks that return the image tokens only "
                         "(ForwardPattern.Pattern_3, DiT's and PixArt's): its pruning loop passes two arguments "
                         "to that pattern's one-argument output handler")
    return full


def prune_runs_on_pattern_3() -> bool:
    """Whether this cache-dit's DBPrune can run Pattern_3 blocks: in 1.5.3 its pruned-blocks class for
    patterns 3-5 calls ``_process_block_outputs(hidden, encoder_hidden)``, which takes one argument
    there (a TypeError at the first block it computes)."""
    import inspect

    from cache_dit.caching.cache_blocks.pattern_3_4_5 import PrunedBlocks_Pattern_3_4_5

    return len(inspect.signature(PrunedBlocks_Pattern_3_4_5._process_block_outputs).parameters) >= 3


def _is_bins(value) -> bool:
    def steps(bins) -> bool:
        return isinstance(bins, (list, tuple)) and bool(bins) and all(isinstance(n, int) and n >= 1 for n in bins)

    return isinstance(value, (list, tuple)) and len(value) == 2 and all(steps(b) for b in value)


def _changed(spec: dict) -> list[str]:
    """The keys besides the shown ones that the setting changes from their defaults."""
    return [k for k in DEFAULTS if k not in ("cache", "Fn", "Bn", "calibrator", "scm", *SHOWN)
            and spec[k] != DEFAULTS[k] and not (k == "taylorseer_order" and spec["calibrator"] != "taylorseer")]


def _scm_text(scm) -> str:
    return scm if isinstance(scm, str) else f"{'-'.join(map(str, scm[0]))}/{'-'.join(map(str, scm[1]))}"


def label(spec: dict) -> str:
    """The method column: ``cache-dit DBCache F1B0 + TaylorSeer``."""
    calibrator = CALIBRATORS[spec["calibrator"]]
    return (f"cache-dit {CACHES[spec['cache']]} F{spec['Fn']}B{spec['Bn']}" + (f" + {calibrator}" if calibrator else "")
            + (" + SCM" if spec["scm"] is not None else ""))


def setting(spec: dict) -> str:
    """The setting column: every threshold and limit the row runs with, ``R=0.08, W=8, SCM=medium``."""
    parts = [f"{SHORT[k]}={spec[k]}" for k in SHOWN]
    if spec["scm"] is not None:
        parts.append(f"SCM={_scm_text(spec['scm'])}")
    parts += [f"{SHORT.get(k, k)}={spec[k]}" for k in _changed(spec)]
    return ", ".join(parts)


def key(spec: dict) -> str:
    """A file-name-safe name of the setting (the row's sample folder); keys at their defaults do not appear."""
    name = f"cache_dit_{spec['cache']}_F{spec['Fn']}B{spec['Bn']}_R{spec['threshold']}_W{spec['warmup']}"
    if spec["calibrator"] != "none":
        name += f"_{spec['calibrator']}"
    if spec["scm"] is not None:
        name += f"_scm{_scm_text(spec['scm'])}"
    name += "".join(f"_{k}{spec[k]}" for k in _changed(spec))
    return slug(name, replacement="")


def _import():
    try:
        import cache_dit
    except ImportError:
        raise ValueError(f"cache_dit rows need cache-dit: {INSTALL}") from None
    logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)  # its per-call INFO lines would bury the job's
    return cache_dit


def _configs(cache_dit, spec: dict, num_steps: int):
    """cache-dit's cache and calibrator configs of a setting."""
    common = dict(Fn_compute_blocks=spec["Fn"], Bn_compute_blocks=spec["Bn"],
                  residual_diff_threshold=float(spec["threshold"]), max_warmup_steps=spec["warmup"],
                  warmup_interval=spec["warmup_interval"], max_cached_steps=spec["max_cached_steps"],
                  max_continuous_cached_steps=spec["max_continuous_cached_steps"],
                  enable_separate_cfg=False, num_inference_steps=num_steps)
    if spec["scm"] is not None:
        try:
            mask = (cache_dit.steps_mask(mask_policy=spec["scm"], total_steps=num_steps) if isinstance(spec["scm"], str)
                    else cache_dit.steps_mask(compute_bins=list(spec["scm"][0]), cache_bins=list(spec["scm"][1]),
                                              total_steps=num_steps))
        except AssertionError as error:
            raise ValueError(f"cache_dit scm {_scm_text(spec['scm'])} at {num_steps} steps: {error}") from None
        common.update(steps_computation_mask=mask, steps_computation_policy=spec["scm_policy"])
    if spec["cache"] == "dbprune":
        cache = cache_dit.DBPruneConfig(**common, non_prune_block_ids=list(spec["non_prune_blocks"]),
                                        enable_dynamic_prune_threshold=bool(spec["dynamic_prune_threshold"]))
    else:
        cache = cache_dit.DBCacheConfig(**common)
    calibrator = None
    if spec["calibrator"] == "taylorseer":
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=spec["taylorseer_order"])
    elif spec["calibrator"] == "foca":
        calibrator = cache_dit.FoCaCalibratorConfig()
    return cache, calibrator


class CacheDitRow:
    """cache-dit on a pipeline's transformer blocks, installed until :meth:`remove` (the interface of
    :class:`~experiments.infra.cache_hooks.CacheHooks`)."""

    def __init__(self, pipe, spec: dict, num_steps: int):
        cache_dit = _import()
        from cache_dit import BlockAdapter, ForwardPattern

        self._cache_dit, self.pipe, self.transformer = cache_dit, pipe, pipe.transformer
        fastattn_adapter = get_adapter(self.transformer)
        cache, calibrator = _configs(cache_dit, spec, num_steps)
        self._forward_before = self.transformer.__dict__.get("forward")
        self._submodule_order = list(self.transformer._modules)
        self.adapter = BlockAdapter(
            pipe=pipe, transformer=self.transformer, blocks=getattr(self.transformer, fastattn_adapter.blocks_attr),
            blocks_name=fastattn_adapter.blocks_attr, forward_pattern=ForwardPattern.Pattern_3,
            patch_functor=self._patch_functor(), check_forward_pattern=True, has_separate_cfg=False)
        cache_dit.enable_cache(self.adapter, cache_config=cache, calibrator_config=calibrator)

    def _patch_functor(self):
        from diffusers import DiTTransformer2DModel

        if not isinstance(self.transformer, DiTTransformer2DModel):
            return None
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        return DiTPatchFunctor()

    @contextmanager
    def generation(self) -> Iterator[None]:
        """Around one pipeline call: nothing to do, cache-dit's wrapped ``__call__`` starts a fresh context."""
        yield

    def cached_steps(self) -> list[int]:
        """The steps at which cache-dit reused its cache in the last generation (its own stats)."""
        stats = self._cache_dit.summary(self.adapter, logging=False)
        return list(stats[0].cached_steps) if stats else []

    def remove(self) -> None:
        self._cache_dit.disable_cache(self.adapter)
        t = self.transformer
        # what disable_cache leaves: the patch functor's forward (it restores the forward it wrapped,
        # which is the functor's), its marker, and block 0's embedding registered on the transformer
        if t.__dict__.get("forward") is not self._forward_before:
            if self._forward_before is None:
                del t.forward
            else:
                t.forward = self._forward_before
        for name in ("_is_patched", "_norm1_emb"):
            if hasattr(t, name):
                delattr(t, name)
        # cache-dit swaps the block list in per call (mock.patch.object), which re-adds it last among
        # the submodules: their order back, so named_modules and state_dict list them as before
        order = {name: i for i, name in enumerate(self._submodule_order)}
        ordered = sorted(t._modules.items(), key=lambda item: order.get(item[0], len(order)))
        t._modules.clear()
        t._modules.update(ordered)
