"""Redundancy statistics against direct computation, their files and figures, the redundancy job,
plan heatmaps."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.figures import plot_all
from analysis.heatmaps import headwise_heatmap, plan_heatmap
from analysis.redundancy import RedundancyStats, summarise_stats
from conftest import LAYERS, dit_inputs
from experiments.redundancy import RedundancyRecorder, record_redundancy
from fastattn import CompressionPlan
from fastattn.kernels import dense_attention, window_attention, window_half_width
from fastattn.attention_io import project_qkv
from test_run import ROOT

STEPS = 4


def capture(pipe, inputs):
    """Inputs and outputs of every self-attention call, per step and layer."""
    seen = []
    hooks = [b.attn1.register_forward_hook(lambda m, a, o, l=l: seen.append((l, a[0].clone(), o.clone())))
             for l, b in enumerate(pipe.transformer.transformer_blocks)]
    with RedundancyRecorder(pipe, window_size=0.25, query_block=7) as recorder, torch.no_grad():
        pipe(**inputs)
    for h in hooks:
        h.remove()
    calls = {}
    for n, (l, x, o) in enumerate(seen):
        calls[(n // LAYERS, l)] = (x, o)
    return recorder.stats(), calls


@torch.no_grad()
def test_statistics_match_direct_computation(dit_pipe):
    stats, calls = capture(dit_pipe, dit_inputs(STEPS))
    assert (stats.num_steps, stats.num_layers, stats.seq_len) == (STEPS, LAYERS, 64)
    attn = dit_pipe.transformer.transformer_blocks[1].attn1
    w = window_half_width(64, 0.25)
    for s in range(STEPS):
        x, out = calls[(s, 1)]
        cos_cfg = F.cosine_similarity(out[:2].flatten(1).double(), out[2:].flatten(1).double(), dim=1).mean()
        assert stats.cfg_cosine[s, 1] == pytest.approx(float(cos_cfg), rel=1e-9)
        if s == 0:
            assert np.isnan(stats.step_cosine[0, 1]) and np.isnan(stats.window_mse[0, 1])
            continue
        x_prev, out_prev = calls[(s - 1, 1)]
        cos = F.cosine_similarity(out.flatten(1).double(), out_prev.flatten(1).double(), dim=1).mean()
        assert stats.step_cosine[s, 1] == pytest.approx(float(cos), rel=1e-9)
        (q, k, v), (qp, kp, vp) = project_qkv(attn, x), project_qkv(attn, x_prev)
        win, win_prev = window_attention(q, k, v, w), window_attention(qp, kp, vp, w)
        res, res_prev = dense_attention(q, k, v) - win, dense_attention(qp, kp, vp) - win_prev
        assert stats.window_mse[s, 1] == pytest.approx(float(((win - win_prev).double() ** 2).mean()), rel=1e-6)
        assert stats.residual_mse[s, 1] == pytest.approx(float(((res - res_prev).double() ** 2).mean()), rel=1e-6)


@torch.no_grad()
def test_distance_histogram_matches_attention_maps(dit_pipe):
    stats, calls = capture(dit_pipe, dit_inputs(STEPS))
    attn = dit_pipe.transformer.transformer_blocks[2].attn1
    expected = np.zeros((2, 64))
    for s in range(STEPS):
        q, k, _ = project_qkv(attn, calls[(s, 2)][0])
        probs = (q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(0)  # [H, L, L]
        for i in range(64):
            for j in range(64):
                expected[:, abs(i - j)] += probs[:, i, j].numpy() / 64
    expected /= STEPS
    np.testing.assert_allclose(stats.distance_mass[2], expected, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(stats.distance_mass.sum(-1), 1.0, rtol=1e-6)
    w = window_half_width(64, 0.25)
    np.testing.assert_allclose(stats.window_share[2], expected[:, : w + 1].sum(-1), rtol=1e-5)


def test_locality_every_k_steps_and_no_cfg(dit_pipe):
    stats = record_redundancy(dit_pipe, dit_inputs(STEPS, guidance=1.0), locality_every=2)
    assert np.isnan(stats.cfg_cosine).all()  # no CFG batch, nothing to compare
    np.testing.assert_allclose(stats.distance_mass.sum(-1), 1.0, rtol=1e-6)


def test_figures_and_numbers_are_written(dit_pipe, tmp_path):
    stats = record_redundancy(dit_pipe, dit_inputs(STEPS))
    figures = plot_all(stats, tmp_path, "tiny")
    assert sorted(figures) == ["cfg_similarity", "locality", "step_similarity", "wars_mse"]
    assert all(p.stat().st_size > 1000 and p.name.startswith("tiny_") for p in figures.values())
    written = stats.save(tmp_path, prefix="tiny")
    loaded = RedundancyStats.load(tmp_path / "tiny.npz")  # what analysis reads back: every field
    for name, value in vars(stats).items():
        np.testing.assert_array_equal(getattr(loaded, name), value, err_msg=name)
    assert type(loaded.num_steps) is int and type(loaded.cond_first) is bool
    np.savez(tmp_path / "other.npz", step_cosine=stats.step_cosine)
    with pytest.raises(ValueError, match="not a redundancy statistics file"):
        RedundancyStats.load(tmp_path / "other.npz")
    assert (tmp_path / "tiny_window_share.csv").read_text().splitlines()[0] == "layer,head,window_share"
    assert len(written) == 6
    summary = summarise_stats(stats)
    w = window_half_width(64, 0.125)  # uniform attention would put band/L^2 of its mass in the window
    assert 0 < summary["window_share_mean"] <= 1
    assert summary["uniform_window_share"] == pytest.approx((64 * (2 * w + 1) - w * (w + 1)) / 64**2)


def test_nothing_recorded_is_an_error(dit_pipe):
    with RedundancyRecorder(dit_pipe) as recorder:
        pass
    with pytest.raises(RuntimeError, match="nothing recorded"):
        recorder.stats()
    assert not dit_pipe.transformer._forward_pre_hooks  # the hooks are gone


def test_plan_and_headwise_heatmaps(tmp_path):
    plan = CompressionPlan([["full", "full"], ["wars", "ast"], ["asc", "wars+asc"]],
                           model={"seq_len": 64, "num_heads": 2, "head_dim": 8})
    assert plan_heatmap(plan, tmp_path / "plan.png").stat().st_size > 1000
    methods = [[["full", "arrow_1/8"], ["cache", "full"]], [["cache", "cache"], ["arrow_1/16", "full"]]]
    assert headwise_heatmap(methods, tmp_path / "heads.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"\[step\]\[layer\]\[head\]"):
        headwise_heatmap([["full"]], tmp_path / "bad.png")


def test_entry_point_with_a_sweep_of_plans(tmp_path):
    plans = tmp_path / "sweep"
    for i, delta in enumerate((0.05, 0.1)):
        plan = CompressionPlan([["full", "full"], ["ast", "wars"]], model={"seq_len": 16, "num_heads": 2, "head_dim": 8},
                               search={"model_name": "tiny_dit", "solver": "dpm_solver_50", "technique": "all",
                                       "threshold": delta})
        plan.save(plans / str(i) / "plan.json")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.redundancy", "model=tiny_dit", "logger=disabled", "num_samples=1", "solver.num_steps=3",
           "model.tiny.sample_size=8", "model.resolution=8", "model.tiny.num_layers=2", f"plans_dir={plans}",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {p.name for p in out.glob("*.png")}
    assert {"tiny_dit_dpm_solver_50_locality.png", "plan_tiny_dit_dpm_solver_50_all_delta0.050.png",
            "plan_tiny_dit_dpm_solver_50_all_delta0.100.png"} <= names
    assert "window_share_mean" in proc.stdout


def test_entry_point_rejects_a_missing_plans_dir(tmp_path):
    cmd = [sys.executable, "-m", "experiments.redundancy", "logger=disabled", f"plans_dir={tmp_path}/none",
           f"hydra.run.dir={tmp_path}/out"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and f"plans_dir not found: {tmp_path}/none" in proc.stderr
    assert "Traceback" not in proc.stderr  # a config error is its one line


def test_recorder_counts_steps_and_cfg_branches_with_the_step_counter(dit_pipe):
    # A sampler that runs the conditional and unconditional passes as two calls per step: one
    # row per step, and the CFG cosine compares the two calls' outputs.
    outputs = []
    attn = dit_pipe.transformer.transformer_blocks[0].attn1
    hook = attn.register_forward_hook(lambda m, a, o: outputs.append(o.clone()))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with RedundancyRecorder(dit_pipe, window_size=0.25) as recorder, torch.no_grad():
        for t in (900, 600, 300):
            for label in (3, 1000):  # conditional, then the null class
                dit_pipe.transformer(x, timestep=torch.tensor([t]), class_labels=torch.tensor([label]))
    hook.remove()
    stats = recorder.stats()
    assert stats.num_steps == 3 and stats.cfg_cosine.shape == (3, LAYERS)
    want = float(F.cosine_similarity(outputs[0].flatten(1).double(), outputs[1].flatten(1).double(), dim=1).mean())
    assert stats.cfg_cosine[0, 0] == pytest.approx(want)
