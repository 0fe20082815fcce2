"""Train the built-in default model: a class-conditional DiTTransformer2DModel in pixel space on
crops of scikit-image's photographs (one class per photograph), and the small classifier that
stands in for the Inception network (FID-small, IS-small) on it.

    python -m experiments.train_default_model                      # GPU: about 10 minutes
    python -m experiments.train_default_model train.minutes=40 device=cpu

Writes ``transformer/`` (diffusers format, fp16 safetensors), ``classifier/``, ``training.json``
(config, data, metrics) and ``checksums.json`` into the Hydra run directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fastattn.utils.io import atomic_write_json

from .infra.app import hydra_app, resolve_device
from .infra.photo_crops import PHOTOS, load_photos
from .models.loaders.pixel_space import IdentityVAE, SmallClassifier
from .models.solvers import make_scheduler

NULL_CLASS = 1000  # DiTPipeline's unconditional label


def build_transformer(model: DictConfig):
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=model.num_heads, attention_head_dim=model.head_dim, in_channels=3, out_channels=3,
        num_layers=model.num_layers, sample_size=model.image_size, patch_size=model.patch_size,
        num_embeds_ada_norm=NULL_CLASS, norm_num_groups=8,
    )
    for block in transformer.transformer_blocks:  # class dropout is done once per sample, below
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return transformer


class CropBank:
    """Every crop of every photograph, precomputed on the device: sampling a batch is one gather."""

    def __init__(self, photos: list[torch.Tensor], size: int, device, stride: int = 1):
        banks = [p.unfold(1, size, stride).unfold(2, size, stride).permute(1, 2, 0, 3, 4)
                 .reshape(-1, 3, size, size) for p in photos]
        self.crops = torch.cat(banks).to(device, torch.float16)
        self.labels = torch.cat([torch.full((len(b),), c) for c, b in enumerate(banks)]).to(device)
        self.class_index = [torch.nonzero(self.labels == c).flatten() for c in range(len(banks))]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.crops.device
        labels = torch.randint(len(self.class_index), (n,), generator=generator, device=device)
        # classes are equally likely; within a class every crop is: a uniform offset into its block
        offsets = torch.rand(n, generator=generator, device=device)
        sizes = torch.tensor([len(i) for i in self.class_index], device=device)
        starts = torch.cumsum(torch.cat([torch.zeros(1, device=device, dtype=torch.long), sizes[:-1]]), 0)
        index = starts[labels] + (offsets * sizes[labels]).long().clamp(max=sizes[labels] - 1)
        images = self.crops[index].float()
        flip = torch.rand(n, generator=generator, device=device) < 0.5
        images[flip] = images[flip].flip(-1)
        return images, labels


def train_classifier(bank: CropBank, cfg: DictConfig, device) -> tuple[SmallClassifier, float]:
    torch.manual_seed(cfg.seed + 1)
    classifier = SmallClassifier(num_classes=len(PHOTOS)).to(device)
    opt = torch.optim.AdamW(classifier.parameters(), lr=cfg.classifier.lr, weight_decay=0.01)
    g = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    for _ in tqdm(range(cfg.classifier.steps), desc="classifier"):
        images, labels = bank.sample(cfg.classifier.batch_size, g)
        loss = F.cross_entropy(classifier((images + 1) / 2), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    classifier.eval()
    g_eval = torch.Generator(device=device).manual_seed(cfg.seed + 3)
    with torch.no_grad():
        images, labels = bank.sample(4096, g_eval)
        accuracy = float((classifier((images + 1) / 2).argmax(-1) == labels).float().mean())
    return classifier, accuracy


def train_transformer(bank: CropBank, cfg: DictConfig, device):
    torch.manual_seed(cfg.seed)
    model = build_transformer(cfg.model).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    betas = torch.linspace(cfg.train.beta_start, cfg.train.beta_end, 1000, device=device, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0).float()
    g = torch.Generator(device=device).manual_seed(cfg.seed + 4)
    deadline = time.perf_counter() + 60 * cfg.train.minutes
    step, losses = 0, []
    bar = tqdm(desc="transformer", unit="step")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    while time.perf_counter() < deadline and step < cfg.train.max_steps:
        x0, labels = bank.sample(cfg.train.batch_size, g)
        labels = torch.where(torch.rand(len(labels), generator=g, device=device) < cfg.train.class_dropout,
                             torch.full_like(labels, NULL_CLASS), labels)
        t = torch.randint(1000, (len(x0),), generator=g, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with autocast:
            pred = model(xt, timestep=t, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - cfg.train.ema)
        step += 1
        losses.append(float(loss.detach()) if step % 100 == 0 else None)  # a host sync every 100 steps only
        bar.update(1)
    bar.close()
    recent = [x for x in losses[-2000:] if x is not None]
    return ema, {"steps": step, "final_loss": sum(recent) / max(len(recent), 1)}


@torch.no_grad()
def sample_accuracy(transformer, classifier, cfg: DictConfig, device) -> dict:
    """Generate with the unmodified DiTPipeline and check the classifier sees the asked-for class."""
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=transformer, vae=IdentityVAE(), scheduler=make_scheduler("dpm_solver")).to(device)
    pipe.set_progress_bar_config(disable=True)
    n, classes = cfg.eval.samples, len(PHOTOS)
    labels = [i % classes for i in range(n)]
    correct = 0
    for start in range(0, n, 256):
        batch = labels[start:start + 256]
        out = pipe(class_labels=batch, num_inference_steps=50, guidance_scale=cfg.eval.guidance_scale,
                   generator=torch.Generator().manual_seed(start), output_type="np").images
        images = torch.from_numpy(out).permute(0, 3, 1, 2).to(device)
        correct += int((classifier(images).argmax(-1).cpu() == torch.tensor(batch)).sum())
    return {"sample_accuracy": correct / n, "samples": n, "guidance_scale": cfg.eval.guidance_scale}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(out_dir: Path, transformer, classifier, record: dict) -> None:
    transformer.to(torch.float16).save_pretrained(out_dir / "transformer", safe_serialization=True)
    classifier.to(torch.float32).save_pretrained(out_dir / "classifier", safe_serialization=True)
    atomic_write_json(out_dir / "training.json", record)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "checksums.json"
                   and p.suffix in (".json", ".safetensors"))
    atomic_write_json(out_dir / "checksums.json", {str(p.relative_to(out_dir)): sha256(p) for p in files})


def train(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.output_dir)
    started = time.perf_counter()
    bank = CropBank(load_photos(), cfg.model.image_size, device, stride=cfg.train.crop_stride)
    classifier, crop_accuracy = train_classifier(bank, cfg, device)
    transformer, stats = train_transformer(bank, cfg, device)
    evaluation = sample_accuracy(transformer.float(), classifier, cfg, device)
    record = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "data": {"classes": [name for name, _ in PHOTOS], "source": "scikit-image bundled photographs",
                 "crops": len(bank.labels)},
        "classifier_crop_accuracy": crop_accuracy,
        **stats, **evaluation,
        "parameters": sum(p.numel() for p in transformer.parameters()),
        "seconds": time.perf_counter() - started,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    save(out_dir, transformer, classifier, record)
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2))


main = hydra_app("train_default", train)

if __name__ == "__main__":
    main()
