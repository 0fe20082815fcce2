"""Compression plans: what each attention layer (or head) does at each denoising step.

:class:`CompressionPlan` is the public face of every plan family: it loads, saves, checks a plan
against a model and counts its attention FLOPs, and dispatches on the file's ``schema_version``
to the family's type, which registers itself by subclassing with a ``schema_version`` (and the
older versions it still reads): :class:`~fastattn.layerwise.plan.LayerPlan` (DiTFastAttn, a
method per step x layer; the default family) and :class:`~fastattn.headwise.plan.HeadPlan`
(DiTFastAttnV2, a method per step x layer x head), each in its family's folder. This module
knows no family: importing :mod:`fastattn` imports both, which fills the registry. Plans are
validated when built, loaded and applied; errors are one line naming the offending field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from .utils.io import atomic_write_json, read_json
from .utils.moved import forward_moved

# Model facts a plan must agree with before it is applied (seq_len may differ: resolution).
_MODEL_KEYS_CHECKED = ("class_name", "num_layers", "num_heads", "head_dim")
# plan.model's counts: positive integers where present (text_len may be 0); FLOPs and the model
# check read them.
_MODEL_COUNTS = {"seq_len": 1, "text_len": 0, "num_layers": 1, "num_heads": 1, "head_dim": 1, "model_dim": 1}
# The largest plan file read. A head-wise FLUX plan (50 steps x 57 layers x 24 heads) is under
# 2 MiB; this leaves room for 15 times as many steps while a crafted file is refused unread.
MAX_PLAN_BYTES = 32 * 2**20
# The first head-wise schema: CompressionPlan.from_heads finds the head-wise family by it (the
# family still reads it).
_HEADWISE_FIRST_SCHEMA = 2


def check_model_counts(model: dict[str, Any]) -> None:
    """One line naming the first count of ``plan.model`` that is not an integer in range."""
    for key, minimum in _MODEL_COUNTS.items():
        value = model.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"plan.model.{key} must be an integer >= {minimum}, got {value!r}")


def require_fields(data: dict, *keys: str) -> None:
    """One line naming the first of ``keys`` missing from a plan file's object."""
    for key in keys:
        if key not in data:
            raise ValueError(f"missing field '{key}'")


class CompressionPlan:
    """A plan of any family. ``CompressionPlan(methods, ...)`` builds the default family's plan
    (a :class:`~fastattn.layerwise.plan.LayerPlan`); :meth:`load` / :meth:`from_dict` build
    whichever family the file's ``schema_version`` names."""

    SCHEMA_VERSION: ClassVar[int]
    _FAMILIES: ClassVar[dict[int, type["CompressionPlan"]]] = {}
    _DEFAULT_SCHEMA: ClassVar[int | None] = None  # the schema of the family registered with default=True
    model: dict[str, Any]
    search: dict[str, Any]

    def __init_subclass__(cls, schema_version: int | None = None, reads: tuple[int, ...] = (),
                          default: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if schema_version is not None:
            cls.SCHEMA_VERSION = schema_version
            for version in (schema_version, *reads):
                CompressionPlan._FAMILIES[version] = cls
            if default:
                CompressionPlan._DEFAULT_SCHEMA = schema_version

    @staticmethod
    def default_family() -> type["CompressionPlan"]:
        """The family ``CompressionPlan(...)`` and :meth:`all_full` build (the layer-wise plan)."""
        family = CompressionPlan._FAMILIES.get(CompressionPlan._DEFAULT_SCHEMA)
        if family is None:
            raise RuntimeError("no default plan family is registered: import fastattn (it registers both families)")
        return family

    def __new__(cls, *args, **kwargs):
        if cls is CompressionPlan:
            cls = CompressionPlan.default_family()
        return super().__new__(cls)

    # -- what every family provides -------------------------------------------------------
    num_steps: int
    num_layers: int
    FLOPS_FIELDS: ClassVar[tuple[str, ...]] = ("seq_len", "num_heads", "head_dim")  # plan.model's, for FLOPs

    def check_flops_fields(self, seq_len: int | None = None) -> None:
        """One line naming the first field of ``plan.model`` that counting attention FLOPs needs
        and the plan lacks or holds out of range (``seq_len`` given: the model's is not needed).
        A run checks this before its first sample: its metrics need them."""
        check_model_counts(self.model)
        for key in self.FLOPS_FIELDS:
            if self.model.get(key) is None and not (key == "seq_len" and seq_len):
                raise ValueError(f"plan.model.{key} is missing: counting attention FLOPs needs "
                                 f"plan.model.{', plan.model.'.join(self.FLOPS_FIELDS)}")

    def uses_cfg_sharing(self) -> bool:
        """Whether some step shares attention across the CFG halves (needs a CFG batch)."""
        raise NotImplementedError

    def counts(self) -> dict[str, int]:
        """How many (step, layer) cells, or (step, layer, head) for head plans, use each method."""
        raise NotImplementedError

    def attention_flops(self, seq_len: int | None = None) -> dict[str, Any]:
        """Attention FLOPs against the raw model: ``fraction`` (the whole attention module,
        projections included, as the paper's Table 1), ``core_fraction`` (score and value
        products only), ``per_step`` and ``per_layer``."""
        raise NotImplementedError

    def render(self) -> str:
        """A compact text grid, one line per step."""
        raise NotImplementedError

    def _check_family(self, info: dict[str, Any]) -> None:
        """Family-specific model checks (e.g. the head count)."""

    def _fields(self) -> dict[str, Any]:
        """The family's own JSON fields."""
        raise NotImplementedError

    @classmethod
    def _from_fields(cls, data: dict[str, Any], model: dict, search: dict) -> "CompressionPlan":
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def check_model(self, info: dict[str, Any], num_steps: int | None = None) -> None:
        """Raise one line if the plan was made for a model (or step count) other than ``info``
        (an adapter's ``describe()``)."""
        if info.get("num_layers") != self.num_layers:
            raise ValueError(
                f"plan has {self.num_layers} layers but {info.get('class_name')} has "
                f"{info.get('num_layers')} self-attention layers"
            )
        self._check_family(info)
        for key in _MODEL_KEYS_CHECKED:
            if key in self.model and key in info and self.model[key] != info[key]:
                raise ValueError(f"plan.model.{key} is {self.model[key]!r} but the model has {info[key]!r}")
        if num_steps is not None and num_steps != self.num_steps:
            raise ValueError(
                f"plan has {self.num_steps} steps but the scheduler runs {num_steps} "
                "transformer calls; search a plan for this step count"
            )

    @classmethod
    def all_full(cls, num_steps: int, num_layers: int, **kwargs) -> "CompressionPlan":
        """The default family's plan that leaves every layer full (bit-identical to the
        unmodified model); the default family overrides this."""
        return CompressionPlan.default_family().all_full(num_steps, num_layers, **kwargs)

    @classmethod
    def from_heads(cls, heads, **kwargs) -> "CompressionPlan":
        """A head-wise (V2) plan from a [step][layer][head] grid of head methods."""
        return CompressionPlan._FAMILIES[_HEADWISE_FIRST_SCHEMA](heads, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The plan as the JSON object :meth:`save` writes."""
        return {"schema_version": self.SCHEMA_VERSION, "num_steps": self.num_steps, "num_layers": self.num_layers,
                **self._fields(), "model": self.model, "search": self.search}

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "CompressionPlan":
        """A plan from its JSON object; ``source`` names it in one-line errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        family = CompressionPlan._FAMILIES.get(version) if isinstance(version, int) else None
        if family is None:
            known = " and ".join(str(v) for v in sorted(CompressionPlan._FAMILIES))
            raise ValueError(f"{source}: schema_version {version!r} is not supported (this fastattn reads {known})")
        for key in ("model", "search"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"{source}: field '{key}' must be an object")
        try:
            check_model_counts(data.get("model", {}))
            plan = family._from_fields(data, dict(data.get("model", {})), dict(data.get("search", {})))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        for key in ("num_steps", "num_layers"):
            if key in data and data[key] != getattr(plan, key):
                raise ValueError(f"{source}: field '{key}' is {data[key]} but the plan has {getattr(plan, key)}")
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressionPlan":
        """Read a plan file of any family; one-line errors name the file and the field."""
        data = read_json(path, "plan", MAX_PLAN_BYTES)
        return cls.from_dict(data, source=str(path))

    def __eq__(self, other) -> bool:
        if not isinstance(other, CompressionPlan):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None


# Names of the layer-wise family that lived here (fastattn.plan.LayerPlan, ...).
__getattr__ = forward_moved(__name__, {name: "fastattn.layerwise.plan" for name in (
    "LayerPlan", "LAYER_SCHEMA_TOTAL_BAND", "WINDOW_SHAPES", "check_window_shape")})
