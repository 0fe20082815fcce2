"""The method vocabulary: what one attention layer does at one denoising step.

DiTFastAttn (NeurIPS 2024) sections 3.2-3.4:

- ``full``      the model's own attention.
- ``wars``      Window Attention with Residual Sharing: window attention W_k plus the residual
                R = O_r - W_r cached at the layer's last ``full`` step r (its refresh step).
- ``ast``       Attention Sharing across Timesteps: the layer's output from its most recent
                computed step, no attention and no q/k/v/out projections.
- ``asc``       Attention Sharing across CFG: full attention on the conditional half of the
                CFG batch, copied to the unconditional half.
- ``wars+asc``  both: W + R on the conditional half, copied to the unconditional half.
- ``wa``        window attention alone, no residual: the ablation of the paper's Figure 9 (right).
- ``forecast``  attention forecasting (ours, beside AST): no attention and no projections; the
                first-order extrapolation O_b + (O_b - O_a) * (t_k - t_b) / (t_b - t_a) of the
                layer's outputs at its last two computed steps a < b (see :data:`FORECAST_AXES`).
"""

from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    """What one attention layer does at one step of a layer-wise (DiTFastAttn) plan; the module
    docstring defines each. A ``str`` (its short name, as plan files store it); parse a user's
    name with :meth:`parse`."""

    FULL = "full"
    WARS = "wars"
    AST = "ast"
    ASC = "asc"
    WARS_ASC = "wars+asc"
    WA = "wa"
    FORECAST = "forecast"

    @property
    def uses_window(self) -> bool:
        """Window attention (the band or tile of the plan's ``window_size``) instead of full attention."""
        return self in (Method.WARS, Method.WARS_ASC, Method.WA)

    @property
    def needs_residual(self) -> bool:
        """WA-RS adds the residual cached at the layer's last full (refresh) step."""
        return self in (Method.WARS, Method.WARS_ASC)

    @property
    def shares_cfg(self) -> bool:
        """Computed on the conditional half of a CFG batch and copied to the unconditional half."""
        return self in (Method.ASC, Method.WARS_ASC)

    @property
    def computes(self) -> bool:
        """False for AST and forecast, which touch neither projections nor attention."""
        return self not in (Method.AST, Method.FORECAST)

    @property
    def reuses_outputs(self) -> int:
        """How many of the layer's earlier computed outputs the method reads: AST 1, forecast 2."""
        return {Method.AST: 1, Method.FORECAST: 2}.get(self, 0)

    @classmethod
    def parse(cls, value: "str | Method", where: str = "method") -> "Method":
        """The method named ``value``; an unknown name is a one-line ValueError naming ``where``."""
        if isinstance(value, Method):
            return value
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(m.value for m in cls)
            raise ValueError(f"{where}: unknown method {value!r} (known: {known})") from None

    def __str__(self) -> str:  # JSON and tables show the short name
        return self.value


# Algorithm 1 tries strategies from the most to the least compressing one (search_plan's default).
PAPER_STRATEGIES: tuple[Method, ...] = (Method.AST, Method.WARS_ASC, Method.WARS, Method.ASC)
# Where the window-only ablation slots in: as compressing as WA-RS.
# Forecast costs what AST costs and is tried before it (where a layer has two computed outputs):
# it only enters a search whose strategies name it (off in the paper presets).
STRATEGY_ORDER: tuple[Method, ...] = (Method.FORECAST, Method.AST, Method.WARS_ASC, Method.WARS, Method.WA,
                                      Method.ASC)

# What forecast extrapolates in: the timestep *value* (the default) or the step *index*. The value is
# the variable the model is conditioned on and that the solver's noise level follows, so on a
# schedule with uneven spacing (Karras sigmas, shifted flow-matching schedules, rounded integer
# timesteps) the output's change between steps scales with the timestep gap, not with the step
# count; on evenly spaced schedules both axes agree.
FORECAST_AXES = ("timestep", "step")

# Which steps refresh the WA-RS residual: the layer's last ``full`` step before a ``wars`` step
# (ours, the default), or its last step with full attention, ``asc`` included, as the published
# DiTFastAttn code does (an ``asc`` refresh computes the conditional half's residual for both).
REFRESH_RULES = ("full", "full_or_asc")


def refreshing_methods(refresh_on: str) -> tuple[Method, ...]:
    """The methods whose step can refresh a WA-RS residual under the rule ``refresh_on``."""
    if refresh_on not in REFRESH_RULES:
        raise ValueError(f"refresh_on must be one of {', '.join(REFRESH_RULES)}, got {refresh_on!r}")
    return (Method.FULL,) if refresh_on == "full" else (Method.FULL, Method.ASC)


def refreshes(method: Method, refreshing: tuple[Method, ...], residual_read_later: bool) -> bool:
    """Whether a layer's step also records the WA-RS residual R = O - W: its method is one of
    ``refreshing`` (:func:`refreshing_methods`) and a later step may read R. The one rule a plan's
    refresh mask, the step state and a search's commit all apply."""
    return residual_read_later and method in refreshing


# Single-letter codes for compact printing of plans (heatmaps use colours instead).
METHOD_CODES = {
    Method.FULL: ".",
    Method.WARS: "w",
    Method.AST: "T",
    Method.ASC: "c",
    Method.WARS_ASC: "W",
    Method.WA: "a",
    Method.FORECAST: "F",
}


def parse_strategies(names) -> tuple[Method, ...]:
    """Parse a user-given strategy list, keeping the paper's order of compression."""
    wanted = {Method.parse(n, "strategies") for n in names}
    if Method.FULL in wanted:
        raise ValueError("strategies: 'full' is the fallback of every decision, not a strategy")
    return tuple(m for m in STRATEGY_ORDER if m in wanted)
