"""Which folders the wheel holds (the metadata is in pyproject.toml).

The checkout keeps its layout: the library in ``fastattn/``, the harness beside it in
``experiments/``, ``analysis/`` and ``conf/``. Installed, the harness lives inside the library as
``fastattn.experiments``, ``fastattn.analysis`` and ``fastattn.conf`` (package_dir maps the
folders), so site-packages gets no generic top-level names and the harness finds ``conf/`` next
to ``experiments/`` in both layouts. Packages are found here rather than listed, so a new
subpackage ships without anyone remembering to add it.
"""

from setuptools import find_namespace_packages, setup

HARNESS = {"experiments": "fastattn.experiments", "analysis": "fastattn.analysis", "conf": "fastattn.conf"}
DATA = {  # package data, by installed package name
    "fastattn.models.default": ["*.json"],
    "fastattn.models.default.classifier": ["*.json", "*.safetensors"],
    "fastattn.models.default.transformer": ["*.json", "*.safetensors"],
    "fastattn.experiments.latency_tables": ["*.json"],
}
SKIP = ["*__pycache__*", "*.egg-info*", "notebooks*"]  # notebooks run from a checkout only


def harness_packages(folder: str, name: str) -> list[str]:
    return [name] + [f"{name}.{sub}" for sub in find_namespace_packages(where=folder, exclude=SKIP)]


packages = find_namespace_packages(include=["fastattn", "fastattn.*"], exclude=SKIP)
for folder, name in HARNESS.items():
    packages += harness_packages(folder, name)
conf_data = {name: ["*.yaml"] for name in packages if name == "fastattn.conf" or name.startswith("fastattn.conf.")}

setup(packages=packages, package_dir={name: folder for folder, name in HARNESS.items()},
      package_data={**DATA, **conf_data})
