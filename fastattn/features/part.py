"""One feature of a handle as a named part, and the ordered registry of the parts a handle holds."""

from __future__ import annotations

from typing import Iterator


class Part:
    """A feature on a handle. :meth:`install` puts it on the model and :meth:`remove` takes off
    exactly that; the other methods are the handle's events, no-ops unless a part needs them."""

    name = ""

    def install(self, handle) -> None:
        """Put the feature on ``handle``'s model (may raise one line: then nothing was installed)."""

    def remove(self, handle) -> None:
        """Undo :meth:`install`."""

    def reset(self, handle) -> None:
        """A new generation starts: drop what the last one left (parts are reset in reverse order)."""

    def begin_call(self, handle, call) -> None:
        """A transformer call was counted (a :class:`~fastattn.family.CallInfo`); parts see it in order."""

    def plan_set(self, handle) -> None:
        """The handle runs another plan (``handle.plan``) from the next generation on."""


class Parts:
    """The parts on one handle, in the order they were installed."""

    def __init__(self):
        self._parts: dict[str, Part] = {}

    def __iter__(self) -> Iterator[Part]:
        return iter(list(self._parts.values()))

    def __reversed__(self) -> Iterator[Part]:
        return reversed(list(self._parts.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def __getitem__(self, name: str) -> Part:
        return self._parts[name]

    def names(self) -> list[str]:
        return list(self._parts)

    def add(self, handle, part: Part) -> Part:
        """Install ``part`` on ``handle`` and register it (last); one part per name."""
        if part.name in self._parts:
            raise ValueError(f"the handle already has a {part.name!r} part")
        part.install(handle)
        self._parts[part.name] = part
        return part

    def remove(self, handle, name: str) -> None:
        """Uninstall the part called ``name``, if there is one."""
        part = self._parts.pop(name, None)
        if part is not None:
            part.remove(handle)

    def remove_all(self, handle) -> None:
        """Uninstall every part, the last installed first."""
        for name in reversed(self.names()):
            self.remove(handle, name)


__all__ = ["Part", "Parts"]
