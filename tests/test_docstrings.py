"""help() says what every public name does: each name in fastattn.__all__, and the public methods
and properties of its classes and of the handle apply_fastattn returns, has a docstring."""

import inspect

import fastattn
from fastattn.hooks import FastAttnHandle


def undocumented(cls: type) -> list[str]:
    missing = []
    for attr in dir(cls):
        if attr.startswith("_"):
            continue
        member = inspect.getattr_static(cls, attr)
        function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
        function = function.fget if isinstance(function, property) else function
        if inspect.isfunction(function) and function.__module__.startswith("fastattn") and not inspect.getdoc(
                getattr(cls, attr)):
            missing.append(f"{cls.__name__}.{attr}")
    return missing


def test_every_public_name_and_method_has_a_docstring():
    missing = []
    for name in fastattn.__all__:
        obj = getattr(fastattn, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            if not (obj.__doc__ or "").strip():
                missing.append(name)
            if inspect.isclass(obj):
                missing += undocumented(obj)
    missing += undocumented(FastAttnHandle)
    assert not missing, missing
    assert {"load", "save", "from_dict", "to_dict"} <= set(dir(fastattn.CompressionPlan))
