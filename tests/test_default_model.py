"""The shipped default model: files and hashes, offline loading, and samples that show their class."""

import shutil

import pytest
import torch

from experiments.models.loaders.builtin import (DEFAULT_MODEL_DIR, class_names, load_default_classifier,
                                           load_default_pipeline, training_record, verify_checksums)


def test_shipped_files_match_their_hashes_and_budget():
    files = verify_checksums()
    assert {"transformer/diffusion_pytorch_model.safetensors", "classifier/diffusion_pytorch_model.safetensors",
            "training.json"} <= set(files)
    total = sum((DEFAULT_MODEL_DIR / name).stat().st_size for name in files)
    assert total <= 20 * 2**20  # 20 MB together


def test_a_corrupt_copy_is_refused(tmp_path):
    copy = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "default")
    weights = copy / "classifier" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256 differs"):
        verify_checksums(copy)
    weights.write_bytes(original)
    (copy / "training.json").unlink()
    with pytest.raises(FileNotFoundError, match="default model file missing"):
        verify_checksums(copy)


def test_model_is_the_real_dit_class_within_budget():
    pipe = load_default_pipeline()
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel"
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    assert n_params <= 10_000_000 and n_params == training_record()["parameters"]
    assert pipe.transformer.config.sample_size // pipe.transformer.config.patch_size == 16  # 256 tokens
    assert len(class_names()) == 8


@torch.no_grad()
def test_samples_are_recognisably_their_classes():
    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    classifier = load_default_classifier()
    labels = list(range(8))
    images = pipe(class_labels=labels, num_inference_steps=20, guidance_scale=4.0, output_type="np",
                  generator=[torch.Generator().manual_seed(100 + i) for i in labels]).images
    predicted = classifier(torch.from_numpy(images).permute(0, 3, 1, 2)).argmax(-1).tolist()
    assert sum(p == l for p, l in zip(predicted, labels, strict=True)) >= 7  # training measured 1024/1024 at 50 steps


def test_training_script_runs_end_to_end(tmp_path):
    """A few steps of the real training script on the CPU write a loadable, hashed model folder."""
    import json
    import subprocess
    import sys

    from experiments.models.loaders.builtin import load_default_pipeline, verify_checksums
    from test_run import ROOT

    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "experiments.train_default_model", "device=cpu", "model.num_layers=1",
           "model.head_dim=8", "train.max_steps=3", "train.batch_size=4", "train.crop_stride=16",
           "classifier.steps=2", "classifier.batch_size=4", "eval.samples=2", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 3 and record["data"]["classes"][0] == "astronaut" and 0 <= record["sample_accuracy"] <= 1
    verify_checksums(out)
    assert load_default_pipeline(folder=out).transformer.config.num_layers == 1


@torch.no_grad()
def test_classifier_features_are_the_penultimate_layer():
    from experiments.models.loaders.pixel_space import ClassifierFeatures

    classifier = load_default_classifier()
    images = torch.rand(3, 3, 32, 32)
    features = ClassifierFeatures(classifier)(images)
    assert features.shape == (3, classifier.config.feature_dim)
    torch.testing.assert_close(classifier.head(features), classifier(images))


def test_main_job_default_reports_fid_small_and_is_small(tmp_path):
    """The default metrics (metrics=small) on the built-in model: FID-small / IS-small with the shipped
    classifier, offline, under keys that cannot be mistaken for Inception FID / IS."""
    from hydra import compose, initialize_config_dir

    from experiments.run import run
    from test_run import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["solver.num_steps=2", "samples.num=4", "samples.batch_size=4",
                                           "calibration.num_samples=1", "metrics.small_reference_num=64",
                                           "metrics.latency.enabled=false", "logger=disabled",
                                           f"plan_cache_dir={tmp_path}/plans"])
    assert cfg.model.name == "small_dit" and cfg.metrics.name == "small"
    cfg.output_dir = str(tmp_path)
    metrics = run(cfg)
    assert metrics["fid_small"] >= 0 and 1 - 1e-6 <= metrics["is_small"] <= 8 + 1e-6
    assert "fid" not in metrics and "is" not in metrics


def test_loading_does_not_ask_for_accelerate(capfd, monkeypatch):
    """diffusers warns once per model, on stderr, when accelerate is missing: twice per run before."""
    import diffusers.models.modeling_utils
    import diffusers.utils

    for module in (diffusers.utils, diffusers.models.modeling_utils):  # as on a machine without accelerate
        monkeypatch.setattr(module, "is_accelerate_available", lambda: False)
    capfd.readouterr()
    load_default_pipeline()
    load_default_classifier()
    assert "accelerate" not in capfd.readouterr().err
