"""The library's internal layering (docs/ARCHITECTURE.md): a module imports only its own layer
and the layers below it, the two plan families never import each other, and the kernels know
nothing above them. Every module must be placed in a layer, so a new one is placed on purpose."""

from test_imports import ROOT, imports_of, module_name

# Bottom to top; a module's layer is the one whose longest prefix names it.
LAYERS = (
    ("foundation", ("fastattn.utils", "fastattn.kernels", "fastattn.attention_io", "fastattn.plan",
                    "fastattn.flops", "fastattn.cache_prefetch", "fastattn.cache_store", "fastattn.cuda_graphs",
                    "fastattn.family", "fastattn.processor_args", "fastattn.core_call", "fastattn.context_parallel", "fastattn.search.losses",
                    # old paths: forwarders that import only fastattn.utils.moved
                    "fastattn.methods", "fastattn.processor", "fastattn.video_flops")),
    ("family data", ("fastattn.layerwise.methods", "fastattn.layerwise.flops", "fastattn.layerwise.plan",
                     "fastattn.layerwise.video_flops", "fastattn.layerwise.sequences", "fastattn.layerwise.ring",
                     "fastattn.headwise.methods",
                     "fastattn.headwise.plan", "fastattn.headwise.ulysses",
                     "fastattn.headwise.latency", "fastattn.headwise.milp", "fastattn.headwise.rse")),
    ("model descriptions", ("fastattn.models",)),
    ("processors", ("fastattn.layerwise.processor", "fastattn.headwise.processor")),
    ("handle", ("fastattn.features", "fastattn.hooks", "fastattn.compile")),
    ("apply", ("fastattn.layerwise.apply", "fastattn.headwise.apply", "fastattn.apply", "fastattn.model_info")),
    ("search", ("fastattn.search",)),
    ("public", ("fastattn", "fastattn.__main__", "fastattn.layerwise", "fastattn.headwise")),
)
FAMILIES = ("fastattn.layerwise", "fastattn.headwise")


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> int:
    """Index in LAYERS of the longest prefix naming ``name``; package __init__s (e.g.
    ``fastattn.layerwise``) are matched exactly, their modules by the longest prefix."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            exact_only = prefix in ("fastattn", "fastattn.layerwise", "fastattn.headwise")
            hit = name == prefix if exact_only else _matches(name, prefix)
            if hit and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer of tests/test_layering.py: place it (and in docs/ARCHITECTURE.md)")
    return best


def library_graph() -> dict[str, set[str]]:
    files = [p for p in sorted((ROOT / "fastattn").rglob("*.py"))]
    names = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, names) for p in files}


def test_every_import_runs_down_the_layers():
    wrong = []
    for name, imported in library_graph().items():
        for target in imported:
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_the_families_do_not_import_each_other():
    wrong = []
    for name, imported in library_graph().items():
        own = next((f for f in FAMILIES if _matches(name, f)), None)
        for target in imported:
            other = next((f for f in FAMILIES if _matches(target, f)), None)
            if own and other and other != own:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_kernels_import_only_kernels_and_utils():
    wrong = [f"{name} imports {target}" for name, imported in library_graph().items()
             if _matches(name, "fastattn.kernels") for target in imported
             if not (_matches(target, "fastattn.kernels") or _matches(target, "fastattn.utils"))]
    assert not wrong, "\n".join(wrong)


def test_the_base_plan_modules_know_no_family():
    wrong = [f"{name} imports {target}" for name, imported in library_graph().items()
             if name in ("fastattn.plan", "fastattn.flops", "fastattn.family") for target in imported
             if any(_matches(target, f) for f in FAMILIES)]
    assert not wrong, "\n".join(wrong)


# The harness's rooms, bottom to top: a module imports only its own room and the rooms below.
# Jobs are the modules at the top of experiments/ (one per command users run).
ROOMS = ("models", "infra", "metrics", "stages", "bench", "jobs")


def room_of(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[1] in ROOMS:  # a room's package
        return parts[1]
    if len(parts) <= 2:
        return "jobs"
    if parts[1] not in ROOMS:
        raise AssertionError(f"{name} is in no room of tests/test_layering.py: place it (and in docs/ARCHITECTURE.md)")
    return parts[1]


def test_harness_imports_run_down_its_rooms():
    files = sorted((ROOT / "experiments").rglob("*.py"))
    names = {module_name(p) for p in files}
    wrong = []
    for path in files:
        name = module_name(path)
        for target in imports_of(path, names):
            if target == "experiments":  # `from .. import metrics`: the name, resolved below
                continue
            if ROOMS.index(room_of(target)) > ROOMS.index(room_of(name)):
                wrong.append(f"{name} ({room_of(name)}) imports {target} ({room_of(target)})")
    assert not wrong, "\n".join(wrong)
