"""The head-wise (DiTFastAttnV2) plan: a method per step x layer x head.

Registered with :class:`~fastattn.plan.CompressionPlan` as schema version 4 (and the schema 2
files it still reads). Its files keep a ``methods`` grid (every layer ``full``: the heads decide)
beside ``heads``, as before.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..flops import core_flops, projection_flops
from ..plan import CompressionPlan, require_fields
from .methods import HeadMethod

_CODES = {"full": ".", "cache": "c", "arrow": "a", "arrow+rs": "r", "cfg": "g"}

# Schema 2 stored an arrow's fraction as the whole band's width (0.125: 1/16 of the image tokens
# on each side); schema 4 stores the fraction on each side, as the layer-wise window_size. Reading
# a schema 2 file halves each fraction: the same band.
HEAD_SCHEMA_WHOLE_BAND = 2


def _parse_grid(heads, whole_band: bool = False) -> list[list[list[HeadMethod]]]:
    """Check ``heads`` is a rectangular [steps][layers][heads] grid and parse every entry
    (``whole_band``: a schema 2 grid, see :data:`HEAD_SCHEMA_WHOLE_BAND`)."""
    if not isinstance(heads, (list, tuple)) or not heads or not isinstance(heads[0], (list, tuple)) or not heads[0]:
        raise ValueError("plan.heads must be a non-empty [step][layer][head] list")
    num_layers, num_heads = len(heads[0]), None
    grid = []
    for s, row in enumerate(heads):
        if not isinstance(row, (list, tuple)) or len(row) != num_layers:
            raise ValueError(f"plan.heads[{s}] must list {num_layers} layers like plan.heads[0]")
        out_row = []
        for l, layer in enumerate(row):
            if not isinstance(layer, (list, tuple)) or not layer:
                raise ValueError(f"plan.heads[{s}][{l}] must be a non-empty list of head methods")
            num_heads = len(layer) if num_heads is None else num_heads
            if len(layer) != num_heads:
                raise ValueError(f"plan.heads[{s}][{l}] has {len(layer)} heads, expected {num_heads} "
                                 "like plan.heads[0][0]")
            out_row.append([HeadMethod.parse(h, f"plan.heads[{s}][{l}][{i}]", whole_band) for i, h in enumerate(layer)])
        grid.append(out_row)
    # A cached head reuses the previous step's output, so step 0 must compute every head.
    for l, layer in enumerate(grid[0]):
        for h, m in enumerate(layer):
            if not m.computes:
                raise ValueError(f"plan.heads[0][{l}][{h}]: 'cache' needs an earlier step of the head to reuse")
    # A residual-sharing head needs a full step of its own to refresh the residual, and one
    # window between refreshes (the residual is full - arrow at that window).
    for l in range(num_layers):
        for h in range(num_heads):
            refreshed, window = False, None
            for s, row in enumerate(grid):
                m = row[l][h]
                if m.kind == "full":
                    refreshed, window = True, None
                elif m.shares_residual:
                    if not refreshed:
                        raise ValueError(f"plan.heads[{s}][{l}][{h}]: {str(m)!r} needs an earlier 'full' step of "
                                         "the head to refresh its residual")
                    if window is not None and m.fraction != window:
                        raise ValueError(f"plan.heads[{s}][{l}][{h}]: {str(m)!r} after {str(HeadMethod('arrow+rs', window))!r} with no "
                                         "'full' step between them (one window per refresh)")
                    window = m.fraction
    return grid


@dataclass(eq=False)
class HeadPlan(CompressionPlan, schema_version=4, reads=(HEAD_SCHEMA_WHOLE_BAND,)):
    """DiTFastAttnV2: [step][layer][head] head methods ("full", "cache", "cfg", "arrow:<f>")."""

    heads: list[list[list[HeadMethod]]]
    model: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    FLOPS_FIELDS = ("seq_len", "text_len", "num_heads", "head_dim")  # the image tokens: seq_len - text_len

    def __post_init__(self):
        self.heads = _parse_grid(self.heads)

    @property
    def num_steps(self) -> int:
        """Denoising steps the plan covers."""
        return len(self.heads)

    @property
    def num_layers(self) -> int:
        """Joint-attention layers (blocks) per step."""
        return len(self.heads[0])

    @property
    def num_heads(self) -> int:
        """Heads per layer."""
        return len(self.heads[0][0])

    def uses_cfg_sharing(self) -> bool:
        """Whether some head uses ``cfg`` (the calls need a CFG batch)."""
        return any(m.kind == "cfg" for row in self.heads for layer in row for m in layer)

    def refresh_rows(self) -> list[list[tuple[float | None, ...] | None]]:
        """[step][layer]: per head, the window whose residual a ``full`` head must refresh at this
        step for a later ``arrow+rs`` step (None: no refresh), or None where no head refreshes."""
        rows: list[list] = [[[None] * self.num_heads for _ in range(self.num_layers)] for _ in range(self.num_steps)]
        for l in range(self.num_layers):
            for h in range(self.num_heads):
                last_full = None
                for s in range(self.num_steps):
                    m = self.heads[s][l][h]
                    if m.kind == "full":
                        last_full = s
                    elif m.shares_residual:
                        rows[last_full][l][h] = m.fraction  # _parse_grid guarantees last_full
        return [[tuple(layer) if any(f is not None for f in layer) else None for layer in row] for row in rows]

    def residual_keep_mask(self) -> list[list[bool]]:
        """[step][layer]: whether the layer's residual cache is still needed after the step."""
        keep = [[False] * self.num_layers for _ in range(self.num_steps)]
        for l in range(self.num_layers):
            needed = False
            for s in reversed(range(self.num_steps)):
                keep[s][l] = needed
                layer = self.heads[s][l]
                # needed before this step if a head uses it here, or uses it later without refreshing here
                needed = any(m.shares_residual for m in layer) or (
                    needed and not all(m.kind == "full" for m in layer))
        return keep

    def keep_mask(self) -> list[list[bool]]:
        """True where a layer must keep its per-head outputs after the step: a head of it is
        cached at the next step."""
        keep = [[any(not m.computes for m in layer) for layer in self.heads[s + 1]] for s in range(self.num_steps - 1)]
        return keep + [[False] * self.num_layers]

    def _check_family(self, info: dict[str, Any]) -> None:
        if info.get("num_heads") is not None and self.num_heads != info["num_heads"]:
            raise ValueError(f"plan.heads has {self.num_heads} heads per layer but {info.get('class_name')} "
                             f"has {info['num_heads']}")

    def _fields(self) -> dict[str, Any]:
        return {"methods": [["full"] * self.num_layers for _ in range(self.num_steps)],
                "heads": [[[str(h) for h in layer] for layer in row] for row in self.heads]}

    @classmethod
    def _from_fields(cls, data: dict[str, Any], model: dict, search: dict) -> "HeadPlan":
        require_fields(data, "heads")
        whole_band = data["schema_version"] == HEAD_SCHEMA_WHOLE_BAND
        plan = cls(_parse_grid(data["heads"], whole_band), model, search)
        methods = data.get("methods")
        if methods is not None and methods != [["full"] * plan.num_layers for _ in range(plan.num_steps)]:
            raise ValueError("field 'methods' of a head-wise plan must be 'full' everywhere (plan.heads decides)")
        return plan

    def render(self) -> str:
        """One line per step; per layer one character per head."""
        legend = " ".join(f"{c}={k}" for k, c in _CODES.items())
        lines = [f"step | layers (heads: {legend})"]
        for s, row in enumerate(self.heads):
            lines.append(f"{s:4d} | " + " ".join("".join(_CODES[m.kind] for m in layer) for layer in row))
        return "\n".join(lines)

    def counts(self) -> dict[str, int]:
        """How many (step, layer, head) cells use each head method, by its name (``arrow:0.125``, ...)."""
        c = Counter(str(m) for row in self.heads for layer in row for m in layer)
        return dict(sorted(c.items()))

    def attention_flops(self, seq_len: int | None = None) -> dict[str, Any]:
        """Attention FLOPs against the raw model (the layer-wise keys, plus ``sparsity``).

        The q/k/v/out projections are counted in full at every step (they are dense matmuls over
        all heads); each head's score and value products count the pairs its method attends (a
        full head that refreshes a residual adds its arrow's pairs). ``sparsity`` is the V2
        paper's attention sparsity: 1 - core_fraction.
        """
        model = self.model
        self.check_flops_fields(seq_len)
        seq_len = int(seq_len or model["seq_len"])
        heads, head_dim, text_len = model["num_heads"], model["head_dim"], model["text_len"]
        image_len = seq_len - int(text_len)
        inner = heads * head_dim
        proj = projection_flops(2, seq_len, model.get("model_dim") or inner, inner)
        raw_core = core_flops(2, heads, head_dim, seq_len * seq_len)
        pair_cache: dict[HeadMethod, int] = {}

        def pairs(m: HeadMethod) -> int:
            if m not in pair_cache:
                pair_cache[m] = m.pairs(image_len, int(text_len))
            return pair_cache[m]

        def cell_core(layer_methods, refresh) -> float:
            total = sum(pairs(m) for m in layer_methods)
            total += sum(pairs(HeadMethod("arrow", f)) for f in refresh or () if f is not None)
            return core_flops(2, 1, head_dim, total)

        refresh = self.refresh_rows()
        cores = [[cell_core(layer, refresh[s][l]) for l, layer in enumerate(row)] for s, row in enumerate(self.heads)]
        n_steps, n_layers = len(cores), len(cores[0])
        n_cells = n_steps * n_layers
        core_total = sum(map(sum, cores))
        raw_total = (proj + raw_core) * n_cells
        return {
            "seq_len": seq_len,
            "fraction": (proj * n_cells + core_total) / raw_total,
            "core_fraction": core_total / (raw_core * n_cells),
            "sparsity": 1 - core_total / (raw_core * n_cells),
            "raw_flops_per_pair": raw_total,
            "flops_per_pair": proj * n_cells + core_total,
            "per_step": [(proj * n_layers + sum(row)) / ((proj + raw_core) * n_layers) for row in cores],
            "per_layer": [(proj * n_steps + sum(cores[s][l] for s in range(n_steps))) / ((proj + raw_core) * n_steps)
                          for l in range(n_layers)],
        }
