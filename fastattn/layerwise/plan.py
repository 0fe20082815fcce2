"""The layer-wise (DiTFastAttn) plan: a method per step x layer.

Registered with :class:`~fastattn.plan.CompressionPlan` as schema version 3 (and the schema 1
files it still reads), and as the default family: ``CompressionPlan(methods, ...)`` and
``CompressionPlan.all_full`` build a :class:`LayerPlan`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..flops import ZERO, LayerCost
from ..plan import CompressionPlan, require_fields
from .flops import method_cost
from .methods import FORECAST_AXES, METHOD_CODES, REFRESH_RULES, Method, refreshes, refreshing_methods

WINDOW_SHAPES = ("band", "tile")


def check_window_shape(value: str, name: str = "window_shape") -> str:
    if value not in WINDOW_SHAPES:
        raise ValueError(f"{name} must be one of {', '.join(WINDOW_SHAPES)}, got {value!r}")
    return value


# Schema 1 stored ``window_fraction``, the band's total width as a fraction of the tokens (so
# 0.125 was L/16 on each side: half the paper's window); schema 3 stores ``window_size``, the
# fraction on each side (flash-attn's window_size; the paper's 1/8 is 0.125). Reading a schema 1
# file takes window_size = window_fraction / 2: the same band.
LAYER_SCHEMA_TOTAL_BAND = 1


@dataclass(eq=False)
class LayerPlan(CompressionPlan, schema_version=3, reads=(LAYER_SCHEMA_TOTAL_BAND,), default=True):
    """DiTFastAttn: a [num_steps][num_layers] grid of methods, the WA-RS window, and what the
    plan was made for (model, search settings). WA-RS refresh steps are not stored: they are
    implied by the grid and ``refresh_on`` (by default the last ``full`` step of a layer before a
    ``wars`` step refreshes its residual; see :data:`REFRESH_RULES`) and exposed by
    :meth:`refresh_mask`."""

    methods: list[list[Method]]
    window_size: float = 0.125  # of the tokens on each side of a query: the paper's 1/8
    model: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    window_shape: str = "band"  # "band" (the paper's 1-D band) or "tile" (2-D square, same FLOPs; 3-D tiles on Wan)
    refresh_on: str = "full"  # one of REFRESH_RULES
    forecast_in: str = "timestep"  # one of FORECAST_AXES: what 'forecast' extrapolates in

    def __post_init__(self):
        if not isinstance(self.methods, (list, tuple)) or not self.methods:
            raise ValueError("plan.methods must be a non-empty list of steps")
        rows = []
        for s, row in enumerate(self.methods):
            if not isinstance(row, (list, tuple)) or not row:
                raise ValueError(f"plan.methods[{s}] must be a non-empty list of layer methods")
            rows.append([Method.parse(m, f"plan.methods[{s}][{l}]") for l, m in enumerate(row)])
        self.methods = rows
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, (int, float)):
            raise ValueError(f"plan.window_size must be a number, got {self.window_size!r}")
        self.window_size = float(self.window_size)
        self.validate()

    # ------------------------------------------------------------------ shape and rules
    @property
    def num_steps(self) -> int:
        """Denoising steps the plan covers (rows of ``methods``)."""
        return len(self.methods)

    @property
    def num_layers(self) -> int:
        """Self-attention layers per step (columns of ``methods``)."""
        return len(self.methods[0])

    def validate(self) -> None:
        """Check the grid is rectangular, the window in range, and every method's cache exists."""
        if not 0 < self.window_size <= 1:
            raise ValueError(f"plan.window_size must be in (0, 1], got {self.window_size}")
        check_window_shape(self.window_shape, "plan.window_shape")
        if self.refresh_on not in REFRESH_RULES:
            raise ValueError(f"plan.refresh_on must be one of {', '.join(REFRESH_RULES)}, got {self.refresh_on!r}")
        if self.forecast_in not in FORECAST_AXES:
            raise ValueError(f"plan.forecast_in must be one of {', '.join(FORECAST_AXES)}, got {self.forecast_in!r}")
        for s, row in enumerate(self.methods):
            if len(row) != self.num_layers:
                raise ValueError(
                    f"plan.methods[{s}] has {len(row)} layers, expected {self.num_layers} like step 0"
                )
        refreshers = " or ".join(f"'{m.value}'" for m in self.refreshing_methods)
        for l in range(self.num_layers):
            seen_refresher = False
            seen_computed = 0
            for s in range(self.num_steps):
                m = self.methods[s][l]
                if m.needs_residual and not seen_refresher:
                    raise ValueError(
                        f"plan.methods[{s}][{l}]: {m.value!r} needs an earlier {refreshers} step of layer {l} "
                        "to refresh its residual"
                    )
                if m is Method.AST and not seen_computed:
                    raise ValueError(
                        f"plan.methods[{s}][{l}]: 'ast' needs an earlier computed step of layer {l} to share"
                    )
                if m is Method.FORECAST and seen_computed < 2:
                    raise ValueError(
                        f"plan.methods[{s}][{l}]: 'forecast' needs two earlier computed steps of layer {l} "
                        f"to extrapolate from (it has {seen_computed})"
                    )
                seen_refresher |= m in self.refreshing_methods
                seen_computed += m.computes

    @classmethod
    def all_full(cls, num_steps: int, num_layers: int, **kwargs) -> "LayerPlan":
        """The plan that leaves every layer full (bit-identical to the unmodified model)."""
        return LayerPlan([[Method.FULL] * num_layers for _ in range(num_steps)], **kwargs)

    @property
    def refreshing_methods(self) -> tuple[Method, ...]:
        """The methods whose step refreshes a WA-RS residual under the plan's ``refresh_on`` rule."""
        return refreshing_methods(self.refresh_on)

    # ------------------------------------------------------------------ derived views
    def refresh_mask(self) -> list[list[bool]]:
        """True where a step (``full``, or also ``asc`` under ``refresh_on="full_or_asc"``) must
        also compute the WA-RS residual for later ``wars`` steps."""
        mask = [[False] * self.num_layers for _ in range(self.num_steps)]
        for l in range(self.num_layers):
            read_later = False  # a WA-RS step follows before the layer's next refreshing step
            for s in reversed(range(self.num_steps)):
                m = self.methods[s][l]
                mask[s][l] = refreshes(m, self.refreshing_methods, read_later)
                if m in self.refreshing_methods:
                    read_later = False
                elif m.needs_residual:
                    read_later = True
        return mask

    def output_cache_mask(self) -> list[list[bool]]:
        """True where a layer's last computed output must still be held after the step: the next
        step reuses it (AST or forecast, through any run of them), or the next step is computed
        and moves it to the forecast's history (:meth:`history_mask`)."""
        shift = self.history_mask()
        mask = [[False] * self.num_layers for _ in range(self.num_steps)]
        for s in range(self.num_steps - 1):
            for l in range(self.num_layers):
                nxt = self.methods[s + 1][l]
                mask[s][l] = not nxt.computes or shift[s + 1][l]
        return mask

    def history_mask(self) -> list[list[bool]]:
        """True at a computed step whose output a later ``forecast`` extrapolates from together
        with the output before it: the step keeps the previous computed output as well (a
        forecast step before the layer's next computed step reads both)."""
        mask = [[False] * self.num_layers for _ in range(self.num_steps)]
        for l in range(self.num_layers):
            forecast_ahead = False  # a forecast step follows before the next computed step
            for s in reversed(range(self.num_steps)):
                m = self.methods[s][l]
                if m.computes:
                    mask[s][l] = forecast_ahead
                    forecast_ahead = False
                elif m is Method.FORECAST:
                    forecast_ahead = True
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
                if m in self.refreshing_methods:
                    needed_later = False
                elif m.needs_residual:
                    needed_later = True
        return mask

    def uses_cfg_sharing(self) -> bool:
        """Whether some step uses ``asc`` or ``wars+asc`` (the calls need a CFG batch)."""
        return any(m.shares_cfg for row in self.methods for m in row)

    def counts(self) -> dict[str, int]:
        """How many (step, layer) cells use each method, every method listed."""
        c = Counter(m.value for row in self.methods for m in row)
        return {m.value: c.get(m.value, 0) for m in Method}

    # ------------------------------------------------------------------ FLOPs
    def attention_flops(self, seq_len: int | None = None) -> dict[str, Any]:
        """Attention FLOPs of this plan against the raw model, per step, per layer and in total.

        ``fraction`` counts the whole attention module (projections included, as the paper's
        Table 1); ``core_fraction`` only the score and value products.
        """
        self.check_flops_fields(seq_len)
        seq_len = seq_len or self.model["seq_len"]
        heads, head_dim = self.model["num_heads"], self.model["head_dim"]
        shape = dict(seq_len=int(seq_len), heads=int(heads), head_dim=int(head_dim),
                     model_dim=self.model.get("model_dim"), window_size=self.window_size,
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

    # ------------------------------------------------------------------ I/O
    def _fields(self) -> dict[str, Any]:
        data = {"window_size": self.window_size, "methods": [[m.value for m in row] for row in self.methods]}
        # absent where they have their default, so older readers still load those plans
        if self.window_shape != "band":
            data["window_shape"] = self.window_shape
        if self.refresh_on != "full":
            data["refresh_on"] = self.refresh_on
        if self.forecast_in != "timestep":
            data["forecast_in"] = self.forecast_in
        return data

    @classmethod
    def _from_fields(cls, data: dict[str, Any], model: dict, search: dict) -> "LayerPlan":
        if "heads" in data:
            raise ValueError("field 'heads' goes with the head-wise plans' schema_version (4, or 2) only")
        if data["schema_version"] == LAYER_SCHEMA_TOTAL_BAND:
            require_fields(data, "methods", "window_fraction")
            fraction = data["window_fraction"]
            window_size = fraction / 2 if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) else fraction
        else:
            require_fields(data, "methods", "window_size")
            window_size = data["window_size"]
        return cls(data["methods"], window_size, model, search,
                   window_shape=data.get("window_shape", "band"), refresh_on=data.get("refresh_on", "full"),
                   forecast_in=data.get("forecast_in", "timestep"))

    def render(self) -> str:
        """Compact text grid: one line per step, one character per layer."""
        legend = "  ".join(f"{c}={m.value}" for m, c in METHOD_CODES.items())
        lines = [f"step | layers 0..{self.num_layers - 1}   ({legend})"]
        for s, row in enumerate(self.methods):
            lines.append(f"{s:4d} | " + "".join(METHOD_CODES[m] for m in row))
        return "\n".join(lines)
