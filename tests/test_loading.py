"""Real checkpoints stay in the code path; offline they fail with what to download."""

import pytest
from hydra import compose, initialize_config_dir

from experiments.models.loaders import load_pipeline
from test_run import ROOT


@pytest.mark.parametrize("model", ["dit_xl_2_512", "pixart_sigma_xl_1024", "pixart_sigma_xl_2k"])
def test_real_configs_name_the_checkpoints_and_fail_offline_with_a_clear_message(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}"])
    first_id = cfg.model.transformer_id or cfg.model.pipeline_id
    with pytest.raises(RuntimeError, match=f"`hf download {first_id}`") as info:
        load_pipeline(cfg.model.family, cfg.model.pipeline_id, cfg.model.transformer_id, cfg.model.dtype)
    assert "\n" not in str(info.value)


def test_real_model_ids():
    expected = {"dit_xl_2_512": "facebook/DiT-XL-2-512",
                "pixart_sigma_xl_1024": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
                "pixart_sigma_xl_2k": "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS"}
    for name, model_id in expected.items():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"model={name}"])
        assert model_id in (cfg.model.pipeline_id, cfg.model.transformer_id)
        if cfg.model.family == "pixart":
            assert cfg.model.pipeline_id == "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
