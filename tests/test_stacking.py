"""fastattn with what users already run: diffusers' attention backends (``set_attention_backend``)."""

import pytest
import torch

from fastattn import CompressionPlan, apply_fastattn, remove_fastattn
from experiments.models.tiny import tiny_flux_pipeline, tiny_text_inputs

STEPS = 3


def flux():
    pipe = tiny_flux_pipeline(sample_size=16, num_layers=1, num_single_layers=1, num_heads=2, head_dim=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe):
    return pipe(**tiny_text_inputs("flux", [0, 1], text_len=7), height=16, width=16, num_inference_steps=STEPS,
                output_type="pt", generator=torch.Generator().manual_seed(0)).images


def all_full():
    return CompressionPlan.from_heads([[["full", "full"]] * 2] * STEPS)


@pytest.mark.parametrize("backend_first", [True, False], ids=["backend_then_fastattn", "fastattn_then_backend"])
def test_full_layers_run_on_the_users_attention_backend(backend_first):
    pipe = flux()
    pipe.transformer.set_attention_backend("_native_math")
    raw = images(pipe)
    pipe.transformer.reset_attention_backend()
    if backend_first:
        pipe.transformer.set_attention_backend("_native_math")
        handle = apply_fastattn(pipe, all_full())
    else:
        handle = apply_fastattn(pipe, all_full())
        pipe.transformer.set_attention_backend("_native_math")
    assert {str(p.inner._attention_backend) for p in handle.processors} == {"AttentionBackendName._NATIVE_MATH"}
    assert torch.equal(images(pipe), raw)
    remove_fastattn(pipe)  # the model keeps the user's backend
    assert all(str(b.attn.processor._attention_backend).endswith("_NATIVE_MATH")
               for b in pipe.transformer.transformer_blocks)
