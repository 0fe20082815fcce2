"""The coverage checks (``experiments.coverage``): which DiT transformer classes of the installed
diffusers fastattn serves, tried as a new user would, through the public API only.

:func:`dit_classes` lists every class in ``diffusers.models.transformers`` that is the
``transformer`` component of a text/class-to-image or text-to-video pipeline;
:func:`check_class` builds one tiny (``experiments.models.tiny.zoo``) and runs the checks, each
catching what fails as a one-line reason.
"""

from __future__ import annotations

import copy
import re
import time
import typing
from typing import Any, Callable

import torch

import fastattn
from fastattn import CompressionPlan, apply_fastattn, remove_fastattn

from fastattn.models import get_adapter

from ..models.tiny.zoo import TINY, UNBUILT
from .definitions import Definition

# Pipelines that are not text/class-to-image or text-to-video: they start from an image, video,
# mask or control signal, edit, refine, or make audio. A class is listed when one of its
# pipelines is none of these.
NOT_GENERATION = re.compile(r"Img2Img|ImageToVideo|Image2Video|I2V|I2I|VideoToVideo|Inpaint|Control|Edit|Refiner"
                            r"|Fill|Kontext|Transfer|ToWorld|(?<!Easy)Animate|Framepack|InContext|Condition|Audio"
                            r"|Music|AceStep|Proteina|SR|DFR|HDR|KV|Layered|Cloze|LongMulti")
# Transformers of generation pipelines that are not DiTs over latents: VQ-Diffusion's
# Transformer2DModel and aMUSEd's UVit2DModel predict discrete image tokens.
NOT_DIT = {"Transformer2DModel", "UVit2DModel"}
CHECKS = ("built", "adapter", "all_full", "removal", "techniques", "search")


def _annotated_classes(annotation: Any) -> list[type]:
    """The classes an ``__init__`` annotation names (``X``, ``X | None``, ``Optional[X]``)."""
    args = typing.get_args(annotation)
    return [a for a in (args or (annotation,)) if isinstance(a, type)]


def dit_classes() -> dict[str, list[str]]:
    """class name -> its text/class-to-image and text-to-video pipelines, in name order."""
    import diffusers
    import diffusers.models.transformers as transformers
    from diffusers.models.modeling_utils import ModelMixin

    dits = {name for name in dir(transformers) if isinstance(getattr(transformers, name, None), type)
            and issubclass(getattr(transformers, name), ModelMixin)} - NOT_DIT
    found: dict[str, list[str]] = {}
    for name in sorted(n for n in dir(diffusers) if n.endswith("Pipeline") and not NOT_GENERATION.search(n)):
        try:
            hints = typing.get_type_hints(getattr(diffusers, name).__init__)
        except Exception:  # a pipeline whose optional dependency is missing: not listed
            continue
        for cls in _annotated_classes(hints.get("transformer")):
            if cls.__name__ in dits:
                found.setdefault(cls.__name__, []).append(name)
    return dict(sorted(found.items()))


class Unbuilt(Exception):
    """A class with no tiny config (its reason is the zoo's)."""


def one_line(error: BaseException, width: int = 200) -> str:
    """The error as one line; fastattn's own one-line refusals and the zoo's reasons as they are."""
    text = " ".join(str(error).split()) or type(error).__name__
    own = isinstance(error, Unbuilt) or (isinstance(error, (ValueError, TypeError)) and "fastattn" in text)
    text = text.split("; supported:")[0] if own else f"{type(error).__name__}: {text}"  # not the adapter list
    return text if len(text) <= width else text[: width - 3] + "..."


def build(name: str) -> torch.nn.Module:
    import diffusers

    if name in UNBUILT:
        raise Unbuilt(UNBUILT[name])
    torch.manual_seed(0)
    return getattr(diffusers, name)(**TINY[name].init).eval()


def call_inputs(name: str, value: float) -> dict[str, Any]:
    """The inputs of one call at timestep ``value`` (of 1000), the same tensors every time."""
    tiny = TINY[name]
    torch.manual_seed(1)
    inputs = tiny.inputs()
    template = torch.as_tensor(inputs[tiny.timestep])
    inputs[tiny.timestep] = torch.full_like(template, value / 1000 if tiny.unit else value)
    return inputs


def tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a model's return value, in order (tuples, lists, output dataclasses)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    return []


def run_loop(model: torch.nn.Module, name: str, values: list[float]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [tensors(model(**call_inputs(name, v))) for v in values]


def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y))
                                    for x, y in zip(a, b))


# ---------------------------------------------------------------------------------- the description
FAMILY_NAMES = {"LayerPlan": "layerwise", "HeadPlan": "headwise"}


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """{num_layers, num_heads, kinds, cores, cfg_batched, families}: what ``fastattn.describe`` says of the model."""
    info = fastattn.describe(model)
    return {"num_layers": info.num_layers, "num_heads": info.num_heads, "kinds": [layer.kind for layer in info.layers],
            "cores": [layer.core for layer in info.layers], "cfg_batched": info.cfg_batched,
            "families": tuple(FAMILY_NAMES.get(f, f) for f in info.families)}


def all_full(family: str, desc: dict[str, Any], steps: int) -> CompressionPlan:
    if family == "headwise":
        heads = [["full"] * desc["num_heads"] for _ in range(desc["num_layers"])]
        return CompressionPlan.from_heads([heads] * steps)
    return CompressionPlan.all_full(steps, desc["num_layers"])


F, WARS, AST, ASC, WARS_ASC = (fastattn.Method(m) for m in ("full", "wars", "ast", "asc", "wars+asc"))


def techniques_plan(desc: dict[str, Any], window_size: float = 0.125) -> CompressionPlan:
    """Five steps that run every layer-wise technique each layer takes: full (refreshing WA-RS's
    residual), WA-RS, AST, then WA-RS+ASC and ASC where the pipelines batch CFG. A layer without an
    SDPA call (linear attention) takes no window: full where the others window."""
    cfg = desc["cfg_batched"]
    window = [F, WARS, AST, WARS_ASC if cfg else WARS, ASC if cfg else F]
    opaque = [F, F, AST, ASC if cfg else F, F]
    columns = [window if core == "sdpa" else opaque for core in desc["cores"]]
    return CompressionPlan([list(row) for row in zip(*columns)], window_size=window_size)


def cfg_batch(inputs: dict[str, Any]) -> dict[str, Any]:
    """The call's inputs as a CFG batch of two equal halves (what CFG pipelines pass): every
    tensor whose first dimension is the latent's batch, doubled."""
    from fastattn.models.adapters.base import latents_of

    latents = latents_of((), inputs)
    if latents is None:  # a list of per-sample latents (Z-Image): no batch to double
        return inputs
    batch = latents.shape[0]

    def doubled(value):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
            return torch.cat([value, value])
        if isinstance(value, (list, tuple)):
            return type(value)(doubled(v) for v in value)
        return value
    return {k: doubled(v) for k, v in inputs.items()}


def float64(inputs: dict[str, Any]) -> dict[str, Any]:
    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.double()
        if isinstance(value, (list, tuple)):
            return type(value)(cast(v) for v in value)
        return value
    return {k: cast(v) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------- the checks
def processors(model: torch.nn.Module) -> dict[str, Any]:
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, processors(model)


def restored(model: torch.nn.Module, before: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> str | None:
    """None when the model's weights and processors are those of ``before``, else what differs."""
    weights, procs = state(model)
    if weights.keys() != before[0].keys() or any(not torch.equal(weights[k], before[0][k]) for k in weights):
        return "removal: the state_dict differs from the raw model's"
    changed = [name for name, p in procs.items() if before[1].get(name) is not p]
    if changed or procs.keys() != before[1].keys():
        return f"removal: processors not restored ({', '.join(changed[:2]) or 'layers added or lost'})"
    return None


def under_plan(model: torch.nn.Module, name: str, plan: CompressionPlan, values: list[float]):
    """The loop's outputs with ``plan`` applied; removed whatever happens."""
    apply_fastattn(model, plan)
    try:
        return run_loop(model, name, values)
    finally:
        remove_fastattn(model)


TECHNIQUE_VALUES = (900.0, 700.0, 500.0, 300.0, 100.0)


def technique_calls(model: torch.nn.Module, name: str, dtype: torch.dtype,
                    values=TECHNIQUE_VALUES) -> list[dict[str, Any]]:
    """The inputs of each call in ``dtype``: a CFG batch where the model takes the doubled inputs
    for one (DiT's pipelines mark the unconditional half by its null class instead)."""
    cast = float64 if dtype == torch.float64 else (lambda inputs: inputs)
    doubled = [cast(cfg_batch(call_inputs(name, v))) for v in values]
    cfg = takes_cfg_batch(model, doubled[0])
    return [call if cfg else cast(call_inputs(name, v)) for call, v in zip(doubled, values, strict=True)]


def runs_in_float64(model: torch.nn.Module, name: str) -> bool:
    """Whether the model runs in float64 at all (some build float32 embeddings inside)."""
    try:
        with torch.no_grad():
            model.double()(**float64(call_inputs(name, 500.0)))
    except Exception:
        return False
    return True


def takes_cfg_batch(model: torch.nn.Module, doubled: dict[str, Any]) -> bool:
    """Whether the model runs the doubled inputs as a CFG batch (its adapter sees both halves;
    an input the doubling cannot tell from a batch-sized one makes the call fail: no CFG then)."""
    if get_adapter(model).cfg_layout(model, (), doubled) is None:
        return False
    try:
        with torch.no_grad():
            model(**doubled)
    except Exception:
        return False
    return True


def techniques_differ(model: torch.nn.Module, name: str, desc: dict[str, Any]) -> str | None:
    """Every layer-wise technique the model takes, run by fastattn on a float64 copy, against the
    same plan run from its definitions (:mod:`.definitions`); None when they agree. A model that
    cannot run in float64 is checked in float32 (``desc["technique_dtype"]`` says which)."""
    model = copy.deepcopy(model)
    exact = runs_in_float64(model, name)
    dtype, tolerance = (torch.float64, 1e-9) if exact else (torch.float32, 1e-4)
    model.to(dtype)
    desc["technique_dtype"] = str(dtype).removeprefix("torch.")
    calls = technique_calls(model, name, dtype)
    plan = techniques_plan({**desc, "cfg_batched": get_adapter(model).cfg_layout(model, (), calls[0]) is not None})
    return definition_difference(model, calls, plan, tolerance)


def definition_difference(model: torch.nn.Module, calls: list[dict], plan, tolerance: float) -> str | None:
    """``plan`` run by fastattn over ``calls`` (one a step) against the same plan run from its
    definitions (:mod:`.definitions`); None where every output agrees within ``tolerance``."""
    apply_fastattn(model, plan)
    try:
        with torch.no_grad():
            ours = [tensors(model(**call)) for call in calls]
    finally:
        remove_fastattn(model)
    defined = [tensors(out) for out in Definition(model, plan).run(calls)]
    dtype = next(model.parameters()).dtype
    for step, (a, b) in enumerate(zip(ours, defined, strict=True)):
        for x, y in zip(a, b, strict=True):
            if not torch.allclose(x, y, rtol=tolerance, atol=tolerance):
                return (f"step {step} ({', '.join(sorted({m.value for m in plan.methods[step]}))}): fastattn differs "
                        f"from the definition by {float((x - y).abs().max()):.2e} in {dtype}")
    return None


class LoopScheduler:
    """What a search needs of a scheduler: ``set_timesteps`` and the ``timesteps`` it sets."""

    def set_timesteps(self, num_inference_steps: int, **_) -> None:
        self.timesteps = torch.linspace(900.0, 100.0, num_inference_steps)


class LoopPipeline:
    """A denoising loop of the tiny model as a pipeline a search calibrates on: one call per step
    (a CFG batch where its pipelines batch CFG), the latents left as they are."""

    def __init__(self, transformer: torch.nn.Module, name: str, cfg: bool):
        self.transformer, self.scheduler, self.name, self.cfg = transformer, LoopScheduler(), name, cfg

    def __call__(self, num_inference_steps: int = 4, **_) -> None:
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            inputs = call_inputs(self.name, float(t))
            self.transformer(**(cfg_batch(inputs) if self.cfg else inputs))


def search_problem(model: torch.nn.Module, name: str, desc: dict[str, Any]) -> str | None:
    """Algorithm 1 over a 4-step loop: it runs and its plan fits the model; None when it does."""
    cfg = takes_cfg_batch(model, cfg_batch(call_inputs(name, 500.0)))
    plan = fastattn.search_plan(LoopPipeline(model, name, cfg), {"num_inference_steps": 4},
                                threshold=0.2, progress=False)
    if plan.num_layers != desc["num_layers"] or plan.num_steps != 4:
        return f"the searched plan has {plan.num_steps} steps x {plan.num_layers} layers"
    apply_fastattn(model, plan)  # and it applies
    remove_fastattn(model)
    return None


class Check:
    """Runs one check into ``row``: pass, or fail with the first failure's one-line reason."""

    def __init__(self, row: dict[str, Any]):
        self.row = row

    def __call__(self, check: str, what: str, run: Callable[[], str | None]) -> bool:
        try:
            problem = run()
        except Exception as error:  # any failure of the model or of fastattn is this check's result
            problem = f"{what}: {one_line(error)}" if what else one_line(error)
        self.row[check] = "fail" if problem else "pass"
        if problem and not self.row["reason"]:
            self.row["reason"] = problem
        return not problem


def check_model(row: dict[str, Any], model: torch.nn.Module, name: str, raw, values: list[float]) -> None:
    """The checks after the build: adapter, all-full per family, removal, the layer-wise techniques."""
    check, holder = Check(row), {}

    def adapter():
        holder["desc"] = desc = describe(model)
        row["families"] = ", ".join(desc["families"]) or "none"
        return None if desc["families"] else f"the description names no plan family (layer kinds {desc['kinds']})"

    if not check("adapter", "", adapter):
        return
    desc, before = holder["desc"], state(model)

    def exact():
        for family in desc["families"]:
            if not same(under_plan(model, name, all_full(family, desc, len(values)), values), raw):
                return f"{family} all-full: outputs differ from the raw model's"
        return None

    check("all_full", "all-full", exact)
    check("removal", "removal", lambda: restored(model, before) or (
        None if same(run_loop(model, name, values), raw) else "removal: outputs differ from the raw model's"))
    if "layerwise" in desc["families"]:
        check("techniques", "techniques", lambda: techniques_differ(model, name, desc))
        if desc.get("technique_dtype") == "float32" and not row["reason"]:
            row["reason"] = "techniques checked in float32 (the model does not run in float64)"
        check("search", "search", lambda: search_problem(model, name, desc))


def check_class(name: str, pipelines: list[str], values: list[float]) -> dict[str, Any]:
    """One row of the table: the class built tiny and every check, each pass / fail / '-'."""
    row = {"class": name, "pipelines": pipelines, "families": "", **dict.fromkeys(CHECKS, "-"), "reason": ""}
    started = time.perf_counter()
    holder = {}

    def built():  # built tiny, and the raw model runs the loop (else its config is what fails)
        holder["model"] = build(name)
        try:
            holder["raw"] = run_loop(holder["model"], name, values)
        except Exception as error:
            return f"raw forward: {one_line(error)}"
        return None

    if Check(row)("built", "", built):
        check_model(row, holder["model"], name, holder["raw"], values)
    row["passed"] = all(row[c] in ("pass", "-") for c in CHECKS) and row["all_full"] == "pass"
    row["seconds"] = round(time.perf_counter() - started, 2)
    return row
