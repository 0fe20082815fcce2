"""Samplers by name, with the settings the papers use."""

from __future__ import annotations

SOLVERS = ("dpm_solver", "ddim", "iddpm", "flow_euler")  # flow_euler: SD3 and FLUX


def make_scheduler(name: str, base_config: dict | None = None):
    """A diffusers scheduler for ``name``; ``base_config`` is a checkpoint's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if name == "flow_euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        base = base_config if base_config is not None else {}
        return FlowMatchEulerDiscreteScheduler.from_config(base)
    classes = {"dpm_solver": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "iddpm": DDPMScheduler}
    if name not in classes:
        raise ValueError(f"solver: unknown solver {name!r} (known: {', '.join(SOLVERS)})")
    cls = classes[name]
    if base_config is not None:
        return cls.from_config(base_config)
    return cls(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
