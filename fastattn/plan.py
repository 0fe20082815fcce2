"""CompressionPlan: which method each self-attention layer uses at each denoising step.

A plan is a [num_steps][num_layers] grid of methods plus what it was made for (model, window,
search settings). It is validated when built, loaded and applied; errors are one line naming the
offending field. WA-RS refresh steps are not stored: they are implied by the grid (the last
``full`` step of a layer before a ``wars`` step refreshes its residual) and exposed by
:meth:`CompressionPlan.refresh_mask`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .flops import ZERO, LayerCost, method_cost
from .methods import METHOD_CODES, Method
from .utils.io import atomic_write_json

SCHEMA_VERSION = 1
WINDOW_SHAPES = ("band", "tile")
HEADWISE_SCHEMA_VERSION = 2  # plans with a method per (step, layer, head); version 1 still loads

# Model facts a plan must agree with before it is applied (seq_len may differ: resolution).
_MODEL_KEYS_CHECKED = ("class_name", "num_layers", "num_heads", "head_dim")


@dataclass
class CompressionPlan:
    methods: list[list[Method]]
    window_fraction: float = 0.125
    model: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    window_shape: str = "band"  # "band" (the paper's 1-D band) or "tile" (2-D square, same FLOPs)
    # DiTFastAttnV2: [step][layer][head] head methods ("full", "cache", "arrow:<f>"); the layer
    # methods are then all "full" and the heads decide. None for a layer-wise (V1) plan.
    heads: list[list[list[str]]] | None = None

    def __post_init__(self):
        if not isinstance(self.methods, (list, tuple)) or not self.methods:
            raise ValueError("plan.methods must be a non-empty list of steps")
        rows = []
        for s, row in enumerate(self.methods):
            if not isinstance(row, (list, tuple)) or not row:
                raise ValueError(f"plan.methods[{s}] must be a non-empty list of layer methods")
            rows.append([Method.parse(m, f"plan.methods[{s}][{l}]") for l, m in enumerate(row)])
        self.methods = rows
        if isinstance(self.window_fraction, bool) or not isinstance(self.window_fraction, (int, float)):
            raise ValueError(f"plan.window_fraction must be a number, got {self.window_fraction!r}")
        self.window_fraction = float(self.window_fraction)
        if self.heads is not None:
            from .headwise.plan_rules import parse_head_grid

            self.heads = parse_head_grid(self.heads, self.methods)
        self.validate()

    @property
    def is_headwise(self) -> bool:
        return self.heads is not None

    # ------------------------------------------------------------------ shape and rules
    @property
    def num_steps(self) -> int:
        return len(self.methods)

    @property
    def num_layers(self) -> int:
        return len(self.methods[0])

    def validate(self) -> None:
        """Check the grid is rectangular, the window in range, and every method's cache exists."""
        if not 0 < self.window_fraction <= 2:
            raise ValueError(f"plan.window_fraction must be in (0, 2], got {self.window_fraction}")
        if self.window_shape not in WINDOW_SHAPES:
            raise ValueError(f"plan.window_shape must be one of {', '.join(WINDOW_SHAPES)}, got {self.window_shape!r}")
        for s, row in enumerate(self.methods):
            if len(row) != self.num_layers:
                raise ValueError(
                    f"plan.methods[{s}] has {len(row)} layers, expected {self.num_layers} like step 0"
                )
        for l in range(self.num_layers):
            seen_full = seen_computed = False
            for s in range(self.num_steps):
                m = self.methods[s][l]
                if m.needs_residual and not seen_full:
                    raise ValueError(
                        f"plan.methods[{s}][{l}]: {m.value!r} needs an earlier 'full' step of layer {l} "
                        "to refresh its residual"
                    )
                if m is Method.AST and not seen_computed:
                    raise ValueError(
                        f"plan.methods[{s}][{l}]: 'ast' needs an earlier computed step of layer {l} to share"
                    )
                seen_full |= m is Method.FULL
                seen_computed |= m.computes
        if self.heads is not None:
            from .headwise.plan_rules import validate_head_grid

            validate_head_grid(self.heads)

    def check_model(self, info: dict[str, Any], num_steps: int | None = None) -> None:
        """Raise if the plan was made for a model (or step count) other than ``info``."""
        if info.get("num_layers") != self.num_layers:
            raise ValueError(
                f"plan has {self.num_layers} layers (plan.methods) but {info.get('class_name')} has "
                f"{info.get('num_layers')} self-attention layers"
            )
        if self.heads is not None and info.get("num_heads") is not None and len(self.heads[0][0]) != info["num_heads"]:
            raise ValueError(f"plan.heads has {len(self.heads[0][0])} heads per layer but {info.get('class_name')} "
                             f"has {info['num_heads']}")
        for key in _MODEL_KEYS_CHECKED:
            if key in self.model and key in info and self.model[key] != info[key]:
                raise ValueError(f"plan.model.{key} is {self.model[key]!r} but the model has {info[key]!r}")
        if num_steps is not None and num_steps != self.num_steps:
            raise ValueError(
                f"plan has {self.num_steps} steps (plan.methods) but the scheduler runs {num_steps} "
                "transformer calls; search a plan for this step count"
            )

    # ------------------------------------------------------------------ derived views
    def refresh_mask(self) -> list[list[bool]]:
        """True where a ``full`` step must also compute the WA-RS residual for later ``wars`` steps."""
        mask = [[False] * self.num_layers for _ in range(self.num_steps)]
        for l in range(self.num_layers):
            last_full = None
            for s in range(self.num_steps):
                m = self.methods[s][l]
                if m is Method.FULL:
                    last_full = s
                elif m.needs_residual:
                    mask[last_full][l] = True  # validate() guarantees last_full exists
        return mask

    def output_cache_mask(self) -> list[list[bool]]:
        """True where a layer's output must still be held after the step: the next step is AST
        (which shares the last computed output, through any run of AST steps)."""
        mask = [[False] * self.num_layers for _ in range(self.num_steps)]
        for s in range(self.num_steps - 1):
            for l in range(self.num_layers):
                mask[s][l] = self.methods[s + 1][l] is Method.AST
        return mask

    def residual_release_mask(self) -> list[list[bool]]:
        """True at the last step that uses a WA-RS residual before the layer's next refresh (or
        the end): the cache can be freed after it, so residuals do not pile up in memory."""
        mask = [[False] * self.num_layers for _ in range(self.num_steps)]
        for l in range(self.num_layers):
            needed_later = False
            for s in reversed(range(self.num_steps)):
                m = self.methods[s][l]
                mask[s][l] = m.needs_residual and not needed_later
                if m is Method.FULL:
                    needed_later = False
                elif m.needs_residual:
                    needed_later = True
        return mask

    def uses_cfg_sharing(self) -> bool:
        return any(m.shares_cfg for row in self.methods for m in row)

    def counts(self) -> dict[str, int]:
        c = Counter(m.value for row in self.methods for m in row)
        return {m.value: c.get(m.value, 0) for m in Method}

    # ------------------------------------------------------------------ FLOPs
    def attention_flops(self, seq_len: int | None = None) -> dict[str, Any]:
        """Attention FLOPs of this plan against the raw model, per step, per layer and in total.

        ``fraction`` counts the whole attention module (projections included, as the paper's
        Table 1); ``core_fraction`` only the score and value products.
        """
        if self.heads is not None:
            from .headwise.plan_rules import headwise_flops

            return headwise_flops(self, seq_len)
        seq_len = seq_len or self.model.get("seq_len")
        heads, head_dim = self.model.get("num_heads"), self.model.get("head_dim")
        if not seq_len or not heads or not head_dim:
            raise ValueError("plan.model needs seq_len, num_heads and head_dim to count FLOPs")
        shape = dict(seq_len=int(seq_len), heads=int(heads), head_dim=int(head_dim),
                     model_dim=self.model.get("model_dim"), window_fraction=self.window_fraction,
                     window_shape=self.window_shape)
        raw = method_cost(Method.FULL, refresh=False, **shape)
        refresh = self.refresh_mask()
        per_cell = [
            [method_cost(m, refresh=refresh[s][l], **shape) for l, m in enumerate(row)]
            for s, row in enumerate(self.methods)
        ]
        total = sum((c for row in per_cell for c in row), ZERO)
        n_cells = self.num_steps * self.num_layers
        per_layer = [sum((per_cell[s][l] for s in range(self.num_steps)), ZERO) for l in range(self.num_layers)]

        def frac(cost: LayerCost, n: int) -> float:
            return cost.total / (raw.total * n)

        return {
            "seq_len": int(seq_len),
            "fraction": frac(total, n_cells),
            "core_fraction": total.core / (raw.core * n_cells),
            "raw_flops_per_pair": raw.total * n_cells,
            "flops_per_pair": total.total,
            "per_step": [frac(sum(row, ZERO), self.num_layers) for row in per_cell],
            "per_layer": [frac(c, self.num_steps) for c in per_layer],
        }

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_heads(cls, heads, **kwargs) -> "CompressionPlan":
        """A head-wise (V2) plan from a [step][layer][head] grid of head methods."""
        if not isinstance(heads, (list, tuple)) or not heads or not isinstance(heads[0], (list, tuple)) or not heads[0]:
            raise ValueError("plan.heads must be a non-empty [step][layer][head] list")
        return cls([[Method.FULL] * len(heads[0]) for _ in heads], heads=heads, **kwargs)

    @classmethod
    def all_full(cls, num_steps: int, num_layers: int, **kwargs) -> "CompressionPlan":
        return cls([[Method.FULL] * num_layers for _ in range(num_steps)], **kwargs)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": HEADWISE_SCHEMA_VERSION if self.heads is not None else SCHEMA_VERSION,
            "num_steps": self.num_steps,
            "num_layers": self.num_layers,
            "window_fraction": self.window_fraction,
            "model": self.model,
            "search": self.search,
            "methods": [[m.value for m in row] for row in self.methods],
        }
        if self.window_shape != "band":  # absent from band plans, so older readers still load them
            data["window_shape"] = self.window_shape
        if self.heads is not None:
            data["heads"] = [[[str(h) for h in layer] for layer in row] for row in self.heads]
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "CompressionPlan":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version not in (SCHEMA_VERSION, HEADWISE_SCHEMA_VERSION):
            raise ValueError(f"{source}: schema_version {version!r} is not supported "
                             f"(this fastattn reads {SCHEMA_VERSION} and {HEADWISE_SCHEMA_VERSION})")
        if (version == HEADWISE_SCHEMA_VERSION) != ("heads" in data):
            raise ValueError(f"{source}: field 'heads' goes with schema_version {HEADWISE_SCHEMA_VERSION} and only with it")
        for key in ("methods", "window_fraction"):
            if key not in data:
                raise ValueError(f"{source}: missing field '{key}'")
        for key in ("model", "search"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"{source}: field '{key}' must be an object")
        try:
            plan = cls(data["methods"], data["window_fraction"], dict(data.get("model", {})),
                       dict(data.get("search", {})), window_shape=data.get("window_shape", "band"),
                       heads=data.get("heads"))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        for key in ("num_steps", "num_layers"):
            if key in data and data[key] != getattr(plan, key):
                raise ValueError(f"{source}: field '{key}' is {data[key]} but methods has {getattr(plan, key)}")
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressionPlan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid plan JSON file ({e})") from None
        return cls.from_dict(data, source=str(path))

    def render(self) -> str:
        """Compact text grid: one line per step, one character per layer (per head if head-wise)."""
        if self.heads is not None:
            from .headwise.plan_rules import render_heads

            return render_heads(self.heads)
        legend = "  ".join(f"{c}={m.value}" for m, c in METHOD_CODES.items())
        lines = [f"step | layers 0..{self.num_layers - 1}   ({legend})"]
        for s, row in enumerate(self.methods):
            lines.append(f"{s:4d} | " + "".join(METHOD_CODES[m] for m in row))
        return "\n".join(lines)

    def __eq__(self, other) -> bool:
        if not isinstance(other, CompressionPlan):
            return NotImplemented
        return self.to_dict() == other.to_dict()
