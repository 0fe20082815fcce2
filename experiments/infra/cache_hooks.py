"""diffusers' cache hooks driven correctly on the pipelines fastattn supports (DiT, PixArt).

What each hook needs there and the pipelines do not give it:

* a cache context (FirstBlockCache, TaylorSeer, MagCache): the DiT and PixArt pipelines set none, and
  DiTTransformer2DModel has no ``enable_cache`` / ``cache_context``; :meth:`CacheHooks.generation` sets
  one around each pipeline call (both CFG halves are one batch: one context) and resets the hooks' state
  after it, so every batch of samples starts fresh;
* the current timestep (PyramidAttentionBroadcast, FasterCache): read from each transformer call;
* MagCache's magnitude ratios: calibrated on the run's own calibration set (:func:`calibrate_mag_ratios`);
* FasterCache: ``tensor_format="BCHW"``, ``class_labels`` among the inputs it halves, and the
  unconditional half first (it drops the first half when it skips the unconditional branch): a
  conditional-first batch (DiT) is swapped around the call and its output swapped back;
* TaylorSeer: its default patterns match no DiT module (``attn1`` ends in a digit); the self-attention
  layers are named explicitly;
* SeaCache: the scheduler's place in the context of every call (``step_index``, ``sigma``,
  ``num_inference_steps``; the DiT and PixArt pipelines give none) and the latents it filters
  (``raw_vision_callback``: each sample's, one frame). Its filter takes a flow-matching sigma
  (x = (1 - s) x0 + s noise); a VP scheduler's step is given the sigma of equal signal-to-noise ratio;
* TextKVCache: it caches the text keys and values of NucleusMoE-Image blocks only; on DiT (no text)
  and PixArt (other blocks) it would hook nothing, so the row is refused in one line.

A setting is ``{"kind": <HOOK_KINDS>, <its keys>}``, or ``{"kind": "cache_dit", ...}`` (cache-dit's
block caches, :mod:`experiments.infra.cache_dit_rows`); :func:`check_spec` names a bad one in one line.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, HookRegistry, MagCacheConfig,
                             PyramidAttentionBroadcastConfig, SeaCacheConfig, TaylorSeerCacheConfig,
                             apply_faster_cache, apply_first_block_cache, apply_mag_cache,
                             apply_pyramid_attention_broadcast, apply_sea_cache, apply_taylorseer_cache)
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from fastattn.family import COND_FIRST
from fastattn.models import get_adapter
from fastattn.models.adapters.base import call_argument
from fastattn.utils.paths import slug

from . import cache_dit_rows

# kind -> (its keys and their defaults; the key a row's label shows)
HOOK_KINDS: dict[str, tuple[dict[str, Any], str]] = {
    "first_block_cache": ({"threshold": 0.05}, "threshold"),
    "mag_cache": ({"max_skip_steps": 3, "threshold": 1.0, "retention_ratio": 0.2}, "max_skip_steps"),
    "taylorseer": ({"cache_interval": 3, "disable_cache_before_step": 3, "max_order": 1}, "cache_interval"),
    "pab": ({"skip": 2, "timestep_range": [100, 800]}, "skip"),
    "faster_cache": ({"preset": "default"}, "preset"),
    "sea_cache": ({"threshold": 0.25, "residual_order": 1, "retention_steps": 1, "cache_end_steps": 1,
                   "max_consecutive_cached": 2, "power_exp": 3.0}, "threshold"),
    "text_kv_cache": ({}, ""),
}
# The block caches fastattn stacks with (they skip whole blocks; see fastattn.features.block_caches):
# cache-dit's skip its middle blocks (Fn..L-Bn) at the steps it caches
STACKABLE = ("first_block_cache", "mag_cache", "cache_dit", "sea_cache")
# FasterCache presets: how much of the schedule (timesteps below the bound) may skip attention / the
# unconditional branch. default is diffusers' own.
FASTER_CACHE_PRESETS = {"light": (401, 361), "default": (681, 641), "wide": (901, 901)}
LABELS = {"first_block_cache": "FirstBlockCache", "mag_cache": "MagCache", "taylorseer": "TaylorSeer on attn1",
          "pab": "PyramidAttentionBroadcast", "faster_cache": "FasterCache", "sea_cache": "SeaCache",
          "text_kv_cache": "TextKVCache"}
SHORT = {"threshold": "t", "max_skip_steps": "K", "cache_interval": "interval", "skip": "skip", "preset": "", "": ""}
TEXT_KV_REFUSAL = ("text_kv_cache: diffusers' TextKVCache caches the text keys and values of NucleusMoE-Image "
                   "blocks only, and the {family} model has none{why}: it would skip nothing")
TEXT_KV_WHY = {"dit": " (DiT is class-conditioned: no text)",
               "pixart": " (its cross-attention blocks are BasicTransformerBlock)"}
FAMILIES = ("dit", "pixart")


def check_spec(spec: dict, where: str) -> dict:
    """The setting with its defaults filled in; a ValueError naming ``where`` for a bad one."""
    kind = spec.get("kind")
    if kind == "cache_dit":
        return cache_dit_rows.check_spec(spec, where)
    if kind not in HOOK_KINDS:
        raise ValueError(f"{where}.kind must be one of {', '.join(HOOK_KINDS)}, cache_dit, got {kind!r}")
    defaults, _ = HOOK_KINDS[kind]
    unknown = set(spec) - set(defaults) - {"kind"}
    if unknown:
        raise ValueError(f"{where}: {kind} has no setting {sorted(unknown)[0]!r} (it takes {', '.join(defaults)})")
    full = {"kind": kind, **defaults, **{k: v for k, v in spec.items() if k != "kind"}}
    positive_int = {"max_skip_steps", "cache_interval", "skip", "max_order"}
    non_negative_int = {"retention_steps", "cache_end_steps", "max_consecutive_cached"}
    for key, value in full.items():
        if key in positive_int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}.{key} must be an integer >= 1, got {value!r}")
        if key in non_negative_int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{where}.{key} must be an integer >= 0, got {value!r}")
        number = key in ("threshold", "retention_ratio", "power_exp")
        if number and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{where}.{key} must be a number >= 0, got {value!r}")
    if kind == "faster_cache" and full["preset"] not in FASTER_CACHE_PRESETS:
        raise ValueError(f"{where}.preset must be one of {', '.join(FASTER_CACHE_PRESETS)}, got {full['preset']!r}")
    if kind == "sea_cache" and full["residual_order"] not in (0, 1):
        raise ValueError(f"{where}.residual_order must be 0 or 1, got {full['residual_order']!r}")
    if kind == "pab":
        low, high = (list(full["timestep_range"]) + [None, None])[:2]
        if not all(isinstance(v, (int, float)) for v in (low, high)) or not low < high:
            raise ValueError(f"{where}.timestep_range must be [low, high] with low < high, got {full['timestep_range']}")
    return full


def spec_label(spec: dict) -> str:
    """The method column of a setting's row."""
    return cache_dit_rows.label(spec) if spec["kind"] == "cache_dit" else LABELS[spec["kind"]]


def _non_default(spec: dict) -> list[str]:
    """The keys besides the row's own that a setting changes from their defaults (in its label and key)."""
    defaults, main = HOOK_KINDS[spec["kind"]]
    return [k for k in defaults if k != main and spec.get(k, defaults[k]) != defaults[k]]


def spec_setting(spec: dict) -> str:
    """What a row's setting column shows: ``t=0.05``, ``K=2``, ``K=1, retention_ratio=0.4``..."""
    if spec["kind"] == "cache_dit":
        return cache_dit_rows.setting(spec)
    key = HOOK_KINDS[spec["kind"]][1]
    if not key:
        return ""
    short = SHORT[key]
    return ", ".join([f"{short + '=' if short else ''}{spec[key]}"] + [f"{k}={spec[k]}" for k in _non_default(spec)])


def spec_key(spec: dict) -> str:
    """A file-name-safe name of the setting (a row's sample folder); keys left at their defaults do not
    appear, so a setting keeps its folder when other keys are added."""
    if spec["kind"] == "cache_dit":
        return cache_dit_rows.key(spec)
    key = HOOK_KINDS[spec["kind"]][1]
    if not key:
        return spec["kind"]
    name = f"{spec['kind']}_{key}{spec[key]}" + "".join(f"_{k}{spec[k]}" for k in _non_default(spec))
    return slug(name, replacement="")


class CacheHooks:
    """One cache hook on a pipeline's transformer, installed until :meth:`remove`."""

    def __init__(self, pipe, spec: dict, num_steps: int, mag_ratios: list[float] | None = None):
        self.transformer, self.spec, self.num_steps = pipe.transformer, spec, num_steps
        self.adapter = get_adapter(self.transformer)
        self.timestep: float = 1000.0
        self.scheduler = pipe.scheduler
        self._torch_hooks: list = []
        self._swapped = False
        self._step: int | None = None  # SeaCache: the step of the generation's last call; None outside one
        kind = spec["kind"]
        if kind == "mag_cache" and mag_ratios is None:
            raise ValueError("mag_cache needs its calibrated ratios (calibrate_mag_ratios)")
        self._hook_names = self._apply(kind, mag_ratios)
        # a registry's cached list of child registries predates the hooks just added
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    def _apply(self, kind: str, mag_ratios) -> tuple[str, ...]:
        s, t = self.spec, self.transformer
        self._torch_hooks.append(t.register_forward_pre_hook(self._read_timestep, with_kwargs=True))
        if kind == "first_block_cache":
            apply_first_block_cache(t, FirstBlockCacheConfig(threshold=float(s["threshold"])))
            return "fbc_leader_block_hook", "fbc_block_hook"
        if kind == "mag_cache":
            apply_mag_cache(t, MagCacheConfig(threshold=float(s["threshold"]), max_skip_steps=int(s["max_skip_steps"]),
                                              retention_ratio=float(s["retention_ratio"]),
                                              num_inference_steps=self.num_steps, mag_ratios=list(mag_ratios)))
            return "mag_cache_leader_block_hook", "mag_cache_block_hook"
        if kind == "taylorseer":
            layers = [rf"{re.escape(self.adapter.blocks_attr)}\.\d+\.{re.escape(self.adapter.attention_attr)}"]
            apply_taylorseer_cache(t, TaylorSeerCacheConfig(
                cache_interval=int(s["cache_interval"]), disable_cache_before_step=int(s["disable_cache_before_step"]),
                max_order=int(s["max_order"]), taylor_factors_dtype=t.dtype, cache_identifiers=layers))
            return ("taylorseer_cache",)
        if kind == "sea_cache":
            self._torch_hooks.append(t.register_forward_pre_hook(self._place_step))
            apply_sea_cache(t, SeaCacheConfig(
                threshold=float(s["threshold"]), residual_order=int(s["residual_order"]),
                retention_steps=int(s["retention_steps"]), cache_end_steps=int(s["cache_end_steps"]),
                max_consecutive_cached=int(s["max_consecutive_cached"]), power_exp=float(s["power_exp"]),
                raw_vision_callback=_sample_frames))
            return "sea_cache_root", "sea_cache_leader_block", "sea_cache_block"
        if kind == "text_kv_cache":
            raise ValueError(TEXT_KV_REFUSAL.format(family=type(t).__name__, why=""))
        if kind == "pab":
            apply_pyramid_attention_broadcast(t, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=int(s["skip"]),
                spatial_attention_timestep_skip_range=tuple(s["timestep_range"]),
                current_timestep_callback=lambda: self.timestep))
            return ("pyramid_attention_broadcast",)
        attention_bound, uncond_bound = FASTER_CACHE_PRESETS[s["preset"]]
        identifiers = ["hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                       "encoder_attention_mask", "class_labels"]
        # outermost: the batch is swapped to unconditional-first before FasterCache's own forward runs
        self._torch_hooks.append(t.register_forward_pre_hook(self._uncond_first, with_kwargs=True))
        self._torch_hooks.append(t.register_forward_hook(self._swap_back))
        apply_faster_cache(t, FasterCacheConfig(
            spatial_attention_timestep_skip_range=(-1, attention_bound),
            unconditional_batch_timestep_skip_range=(-1, uncond_bound),
            spatial_attention_block_identifiers=(rf"{self.adapter.blocks_attr}.*{self.adapter.attention_attr}",),
            attention_weight_callback=lambda _: 0.5, tensor_format="BCHW", current_timestep_callback=lambda: self.timestep,
            _unconditional_conditional_input_kwargs_identifiers=identifiers))
        return "faster_cache_denoiser", "faster_cache_block"

    # -- per call ---------------------------------------------------------------------------
    def _read_timestep(self, module, args, kwargs):
        t = call_argument(module, args, kwargs, "timestep")
        if isinstance(t, torch.Tensor) and t.numel():
            self.timestep = float(t.reshape(-1)[0])
        elif isinstance(t, (int, float)):
            self.timestep = float(t)

    def _place_step(self, module, args):
        """The step this call belongs to, as a pipeline with cache contexts would give it (one call a
        step: both CFG halves are one batch)."""
        if self._step is None:
            return
        self._step += 1
        # contexts are frozen: a new one of the same name (the hooks' state is kept by name)
        _set_cache_context(self.transformer, CacheContext(
            "cond", step_index=self._step, num_inference_steps=self.num_steps, timestep=self.timestep,
            sigma=flow_sigma(self.scheduler, self.timestep)))

    def _uncond_first(self, module, args, kwargs):
        self._swapped = self.adapter.cfg_layout(module, args, kwargs) == COND_FIRST
        if not self._swapped:
            return None
        batch = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).shape[0]

        def swap(v):
            return v.roll(batch // 2, dims=0) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch else v

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    def _swap_back(self, module, args, output):
        if not self._swapped:
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        back = sample.roll(sample.shape[0] // 2, dims=0)
        if isinstance(output, tuple):
            return (back, *output[1:])
        output.sample = back
        return output

    # -- generations ------------------------------------------------------------------------
    @contextmanager
    def generation(self) -> Iterator[None]:
        """Around one pipeline call: the cache context the hooks read their state by, then a reset."""
        self._step = -1
        _set_cache_context(self.transformer, CacheContext("cond"))
        try:
            yield
        finally:
            _set_cache_context(self.transformer, None)
            self._step = None
            HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks()

    def remove(self) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        for name in self._hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
        if self.transformer.__dict__.get("forward") is not None and not registry.hooks:
            del self.transformer.forward  # the root hook (FasterCache) left the bound forward as an attribute
        for h in self._torch_hooks:
            h.remove()
        self._torch_hooks.clear()


def _sample_frames(module, args, kwargs) -> list[torch.Tensor]:
    """SeaCache's latents of a call: each sample's (C, H, W) latent as one frame, (C, 1, H, W). The
    halves of a CFG batch hold the same latents, so the second half is left out: its frames would
    repeat the first half's distances, which leaves their mean as it is, at an FFT and a host read
    each (half of SeaCache's time per step on the built-in model)."""
    hidden = call_argument(module, args, kwargs, "hidden_states")
    if not (isinstance(hidden, torch.Tensor) and hidden.ndim == 4):
        return []
    half = hidden.shape[0] // 2
    if half and hidden.shape[0] == 2 * half and torch.equal(hidden[:half], hidden[half:]):
        hidden = hidden[:half]
    return [sample.unsqueeze(1) for sample in hidden]


def flow_sigma(scheduler, timestep: float) -> float:
    """The flow-matching sigma of a step: the scheduler's own where it is one, else (a VP schedule,
    x = a x0 + s noise) s / (a + s), the sigma of equal signal-to-noise ratio."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return min(max(timestep / 1000.0, 0.0), 1.0)
    index = min(max(int(round(timestep)), 0), len(alphas) - 1)
    alpha_bar = float(alphas[index])
    a, s = alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5
    return s / (a + s)


def install(pipe, spec: dict, num_steps: int, mag_ratios: list[float] | None = None):
    """The row's cache on ``pipe``: diffusers' hook (:class:`CacheHooks`) or cache-dit's
    (:class:`~experiments.infra.cache_dit_rows.CacheDitRow`); each has ``generation()`` and ``remove()``."""
    if spec["kind"] == "cache_dit":
        return cache_dit_rows.CacheDitRow(pipe, spec, num_steps)
    return CacheHooks(pipe, spec, num_steps, mag_ratios if spec["kind"] == "mag_cache" else None)


def check_family(family: str, guidance_scale: float, specs: list[dict]) -> None:
    """Hooks and settings the comparison can drive on this model (one-line ValueError)."""
    if family not in FAMILIES:
        raise ValueError(f"model.family: the cache hooks are driven on {', '.join(FAMILIES)} models, got {family!r}")
    if any(s["kind"] == "text_kv_cache" for s in specs):
        raise ValueError(TEXT_KV_REFUSAL.format(family=family, why=TEXT_KV_WHY.get(family, "")))
    if guidance_scale <= 1 and any(s["kind"] == "faster_cache" for s in specs):
        raise ValueError("faster_cache approximates the unconditional branch: it needs guidance_scale > 1")


@torch.no_grad()
def calibrate_mag_ratios(pipe, inputs: dict) -> list[float]:
    """MagCache's magnitude ratios of this model and schedule, as its calibration mode defines them:
    per step, the mean over samples and tokens of |r_t| / |r_{t-1}|, r the residual the blocks add
    (output of the last block minus input of the first); 1.0 at the first step."""
    blocks = get_adapter(pipe.transformer).blocks(pipe.transformer)
    seen: dict[str, Any] = {"input": None, "previous": None, "ratios": []}

    def first_input(module, args, kwargs):
        seen["input"] = call_argument(module, args, kwargs, "hidden_states")

    def last_output(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        residual = (hidden - seen["input"]).float()
        previous = seen["previous"]
        seen["ratios"].append(1.0 if previous is None else float(
            (torch.linalg.norm(residual, dim=-1) / (torch.linalg.norm(previous, dim=-1) + 1e-8)).mean()))
        seen["previous"] = residual

    hooks = [blocks[0].register_forward_pre_hook(first_input, with_kwargs=True),
             blocks[-1].register_forward_hook(last_output)]
    try:
        pipe(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen["ratios"]
