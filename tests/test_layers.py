"""The packages import one way: experiments/ uses fastattn/ and analysis/; analysis/ only reads
files and draws, so it never imports experiments/ (nor do its notebooks); fastattn/ imports neither."""

import ast
import json

import pytest

from test_run import ROOT


HARNESS = ("experiments", "analysis")
ENTRY = "fastattn/__main__.py"  # `python -m fastattn`: the command line's door into the harness, not the library


def package_of(module: str) -> str:
    """The package a module belongs to; installed, the harness's are inside fastattn (fastattn.experiments)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "fastattn" and parts[1:2] and parts[1] in HARNESS else parts[0]


def imported_packages(source: str) -> set[str]:
    """Top-level packages named by every absolute import, at any depth (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {package_of(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(package_of(node.module))
    return names


def sources(package: str):
    """(file, Python source) of every module and every notebook's code below ``package``."""
    folder = ROOT / package
    for path in sorted(folder.rglob("*.py")):
        yield path.relative_to(ROOT), path.read_text()
    for path in sorted(folder.rglob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        yield path.relative_to(ROOT), "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_imports_are_found_at_any_depth():
    source = "import torch\nimport analysis.tables as t\ndef f():\n    from experiments.infra.app import hydra_app\n" \
             "    from .local import x\n"
    assert imported_packages(source) == {"torch", "analysis", "experiments"}
    assert imported_packages("from fastattn.experiments.cli import main\nimport fastattn.plan") == \
        {"experiments", "fastattn"}


@pytest.mark.parametrize("package,forbidden", [("fastattn", {"experiments", "analysis"}),
                                               ("analysis", {"experiments"})])
def test_packages_import_one_way(package, forbidden):
    found = list(sources(package))
    assert len(found) > 3
    offenders = [f"{path}: imports {sorted(imported_packages(source) & forbidden)}" for path, source in found
                 if imported_packages(source) & forbidden and path.as_posix() != ENTRY]
    assert not offenders, "\n".join(offenders)
