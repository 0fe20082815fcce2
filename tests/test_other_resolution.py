"""A plan applied where the calls have another token count than it was searched at: one warning
line naming both (once), refusable, or allowed; checked once per generation, not per layer call."""

import logging

import pytest
import torch

from conftest import LAYERS, dit_inputs
from fastattn import CompressionPlan, apply_fastattn, remove_fastattn, search_plan
from fastattn.family import FamilyState, OtherResolutionError
from experiments.models.tiny import TINY_MMDIT_BUILDERS, tiny_dit_pipeline, tiny_text_inputs

STEPS = 4


def dit(sample_size):
    pipe = tiny_dit_pipeline(sample_size=sample_size, num_layers=LAYERS, num_heads=2, head_dim=8, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def plan_at_64_tokens():
    plan = search_plan(dit(16), dit_inputs(STEPS), threshold=0.15, progress=False)  # 8x8 patches
    assert plan.model["seq_len"] == 64 and plan.counts()["full"] < STEPS * LAYERS
    return plan


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fastattn" and r.levelno == logging.WARNING]


def test_another_resolution_warns_once_naming_both_counts(plan_at_64_tokens, caplog, monkeypatch):
    checks = []
    record = FamilyState.record_seq_len
    monkeypatch.setattr(FamilyState, "record_seq_len", lambda self, n: (checks.append(n), record(self, n)))
    pipe = dit(24)  # 12x12 patches: 144 tokens
    apply_fastattn(pipe, plan_at_64_tokens)
    with caplog.at_level(logging.WARNING, logger="fastattn"):
        pipe(**dit_inputs(STEPS))
        pipe(**dit_inputs(STEPS, seed=1))
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "\n" not in messages[0]
    assert messages[0].startswith("plan searched at 64 tokens (plan.model.seq_len) runs on calls of 144 tokens")
    assert checks == [144, 144]  # once per generation, not once per layer call


def test_the_searched_resolution_and_allow_say_nothing(plan_at_64_tokens, caplog):
    with caplog.at_level(logging.WARNING, logger="fastattn"):
        same = dit(16)
        apply_fastattn(same, plan_at_64_tokens)
        same(**dit_inputs(STEPS))
        other = dit(24)
        apply_fastattn(other, plan_at_64_tokens, other_resolution="allow")
        images = other(**dit_inputs(STEPS)).images
    assert warnings_of(caplog) == [] and images.shape[1:3] == (24, 24)


def test_refuse_stops_the_generation_at_its_first_attention_call(plan_at_64_tokens):
    pipe = dit(24)
    apply_fastattn(pipe, plan_at_64_tokens, other_resolution="refuse")
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(OtherResolutionError, match="plan searched at 64 tokens .* runs on calls of 144 tokens: refused"):
        pipe(**dit_inputs(STEPS))
    assert len(calls) == 1
    hook.remove()
    remove_fastattn(pipe)
    with pytest.raises(ValueError, match="other_resolution must be one of warn, refuse, allow, got 'never'"):
        apply_fastattn(pipe, plan_at_64_tokens, other_resolution="never")


def test_headwise_plans_compare_the_joint_sequence():
    def sd3(side):
        pipe = TINY_MMDIT_BUILDERS["sd3"](sample_size=side, num_heads=2, head_dim=8, num_layers=2)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def inputs(side):
        return dict(tiny_text_inputs("sd3", [0, 1], text_len=5, guidance_scale=4.0), height=side, width=side,
                    num_inference_steps=3, guidance_scale=4.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0))

    plan = CompressionPlan.from_dict({
        "schema_version": 2, "heads": [[["full"] * 2] * 2] + [[["cache"] * 2] * 2] * 2,
        "model": {"seq_len": 64 + 5, "text_len": 5}})
    pipe = sd3(24)  # 144 image tokens + 5 text tokens
    apply_fastattn(pipe, plan, other_resolution="refuse")
    with pytest.raises(OtherResolutionError, match="searched at 69 tokens .* calls of 149 tokens"):
        pipe(**inputs(24))
    remove_fastattn(pipe)
    pipe = sd3(16)
    apply_fastattn(pipe, plan, other_resolution="refuse")
    pipe(**inputs(16))  # the searched resolution runs
