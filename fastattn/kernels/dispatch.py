"""Which kernel runs an attention call: one registry of backends, one setting, one choice.

Each backend declares what it has kernels for (``kinds``) and what it runs on (device types,
dtypes, smallest head dim, and ``usable``: its package, GPU generation, the FA4 mode).
:func:`choose` is the one place every kernel entry point asks: ``auto`` takes the first backend
of :data:`PREFERENCE` that runs the call; a named backend (:func:`attention_backend`,
``set_window_backend``) serves every windowed kind it has a kernel for and fails in one line where
it cannot run, and a kind it has no kernel for stays on ``auto``. Dense attention follows the FA4
mode only, so the model's own full layers keep one kernel whatever window backend a benchmark names.

The setting is process-wide: :func:`configure` sets it, :func:`attention_backend` sets it for a
block and restores the previous one on exit. Each kernel module registers its own backend
(:func:`register`) beside its kernels, so this module imports none of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

# dense; 1-D band; WA-RS refresh; 2-D tile; 3-D video tile; head-wise arrow
KINDS = ("dense", "window", "refresh", "tile", "video", "arrow")
WINDOWED = KINDS[1:]  # the kinds a named backend applies to
WINDOW_BACKENDS = ("auto", "fa4", "triton", "flex", "sdpa")
PREFERENCE = ("fa4", "flex", "triton", "sdpa")  # auto's order
FA4_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Backend:
    name: str
    kinds: tuple[str, ...]
    needs: str  # what it needs to run, for the one-line error when it is named and cannot
    devices: tuple[str, ...] | None = None  # device types; None: any (or decided by ``usable``)
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any
    min_head_dim: int = 0
    usable: Callable[[torch.Tensor, torch.Tensor | None, str], bool] | None = None  # (q, v, kind)
    problem: Callable[[], str | None] | None = None  # why it cannot run in this process at all

    def fits(self, q: torch.Tensor) -> bool:
        """The declared device, dtype and head-dim constraints."""
        return ((self.devices is None or q.device.type in self.devices)
                and (self.dtypes is None or q.dtype in self.dtypes) and q.shape[-1] >= self.min_head_dim)

    def runs(self, q: torch.Tensor, v: torch.Tensor | None, kind: str) -> bool:
        return kind in self.kinds and (self.fits(q) if self.usable is None else self.usable(q, v, kind))


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name not in WINDOW_BACKENDS[1:]:
        raise ValueError(f"unknown attention backend {backend.name!r}")
    BACKENDS[backend.name] = backend
    return backend


# Exact everywhere (masked where the kind is sparse), dense work.
register(Backend("sdpa", KINDS, needs="nothing"))


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"  # for the windowed kinds
    fa4: str = "auto"  # auto | on | off


_settings = Settings()


def current() -> Settings:
    return _settings


def _checked(backend: str | None, fa4) -> Settings:
    settings = _settings
    if backend is not None:
        if backend not in WINDOW_BACKENDS:
            raise ValueError(f"window backend must be one of {', '.join(WINDOW_BACKENDS)}, got {backend!r}")
        settings = replace(settings, backend=backend)
    if fa4 is not None:
        if isinstance(fa4, bool):  # YAML true / false
            fa4 = "on" if fa4 else "off"
        if fa4 not in FA4_MODES:
            raise ValueError(f"fa4 must be auto, on or off (or true / false), got {fa4!r}")
        if fa4 == "on" and (problem := BACKENDS["fa4"].problem()):
            raise RuntimeError(f"fa4=on but FlashAttention-4 cannot run: {problem}")
        settings = replace(settings, fa4=fa4)
    return settings


def configure(backend: str | None = None, *, fa4=None) -> None:
    """Set the window backend (``auto`` or one of the backends) and/or the FA4 mode for the process."""
    global _settings
    _settings = _checked(backend, fa4)


@contextlib.contextmanager
def attention_backend(backend: str | None = None, *, fa4=None):
    """The window backend and/or FA4 mode inside the block; the previous setting after it."""
    global _settings
    previous = _settings
    _settings = _checked(backend, fa4)
    try:
        yield _settings
    finally:
        _settings = previous


def choose(q: torch.Tensor, kind: str, v: torch.Tensor | None = None) -> str:
    """The backend that runs a ``kind`` call on ``q`` (and ``v``, where its head dim differs)."""
    named = _settings.backend
    if named != "auto" and kind in WINDOWED and kind in BACKENDS[named].kinds:
        if not BACKENDS[named].runs(q, v, kind):
            raise RuntimeError(f"window backend {named!r} needs {BACKENDS[named].needs}")
        return named
    return next(name for name in PREFERENCE if BACKENDS[name].runs(q, v, kind))
