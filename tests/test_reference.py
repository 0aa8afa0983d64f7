"""Tests of the shipped reference DiT, its sampler, the classifier and the digits data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from adacache import reference
from adacache.reference import data
from adacache.reference.model import NULL_CLASS


@pytest.fixture(scope="module")
def dit() -> nn.Module:
    return reference.load_reference_model()


def test_digits_data_and_split() -> None:
    images, labels = data.load_digits_tensors()
    assert images.shape == (1797, 1, 16, 16) and labels.shape == (1797,)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() == -1.0 and images.max() > 0.9  # background -1, strokes near +1
    s1, s2 = data.load_split(seed=0), data.load_split(seed=0)
    assert torch.equal(s1.test_labels, s2.test_labels) and torch.equal(s1.train_images, s2.train_images)
    assert s1.train_images.shape[0] + s1.test_images.shape[0] == 1797
    assert 350 <= s1.test_images.shape[0] <= 370
    # Stratified: every class has its share in the held-out part.
    counts = torch.bincount(s1.test_labels, minlength=10)
    assert counts.min() >= 34
    s3 = data.load_split(seed=1)
    assert not torch.equal(s1.test_images, s3.test_images)


def test_random_shift_keeps_shape_and_background() -> None:
    x = data.load_split().train_images[:8]
    y = data.random_shift(x, 1, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1.0
    assert torch.equal(data.random_shift(x, 0), x)


def test_checkpoint_layout(dit: nn.Module) -> None:
    from diffusers import DiTTransformer2DModel

    d = reference.DIT_DIR
    assert (d / "diffusion_pytorch_model.safetensors").stat().st_size <= 20 * 1024 * 1024
    model = DiTTransformer2DModel.from_pretrained(str(d))
    assert isinstance(model, DiTTransformer2DModel)
    assert len(model.transformer_blocks) == 8
    cfg = model.config
    assert (cfg.in_channels, cfg.sample_size, cfg.patch_size, cfg.num_embeds_ada_norm) == (1, 16, 2, 10)
    assert cfg.norm_type == "ada_norm_zero"
    # diffusers adds one extra (null) row to every label table: index 10 is the CFG null class.
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NULL_CLASS + 1 == 11
    sched_cfg = json.loads((d / "scheduler_config.json").read_text())
    assert sched_cfg["_class_name"] == "DDIMScheduler"
    assert sched_cfg["num_train_timesteps"] == 1000 and sched_cfg["beta_schedule"] == "linear"
    sched = reference.load_reference_scheduler()
    assert sched.config.beta_start == pytest.approx(1e-4) and sched.config.beta_end == pytest.approx(0.02)


def test_sampling_deterministic_and_batch_independent(dit: nn.Module) -> None:
    a = reference.sample(dit, [3, 7], seeds=[11, 12], num_steps=4)
    b = reference.sample(dit, [3, 7], seeds=[11, 12], num_steps=4)
    assert a.shape == (2, 1, 16, 16)
    assert torch.equal(a, b)
    # A sample depends only on its own seed and label, not on the rest of the batch.
    c = reference.sample(dit, [7], seeds=[12], num_steps=4)
    torch.testing.assert_close(a[1:], c, rtol=0, atol=1e-5)
    d = reference.sample(dit, [3, 7], seeds=[11, 13], num_steps=4)
    assert not torch.allclose(a[1], d[1])
    assert a.min() >= -1.0 and a.max() <= 1.0


class _Recorder(nn.Module):
    """Wraps the DiT with the same call signature and records what the sampler passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor):  # noqa: ANN201
        self.calls.append((hidden_states.shape[0], timestep.clone(), class_labels.clone()))
        return self.inner(hidden_states=hidden_states, timestep=timestep, class_labels=class_labels)


def test_sampler_uses_cond_uncond_batch_and_accepts_wrappers(dit: nn.Module) -> None:
    rec = _Recorder(dit)
    out = reference.sample(rec, [1, 4, 9], seeds=[0, 1, 2], num_steps=3, guidance_scale=4.0)
    assert len(rec.calls) == 3
    for bs, t, labels in rec.calls:
        assert bs == 6
        assert labels.tolist() == [1, 4, 9, NULL_CLASS, NULL_CLASS, NULL_CLASS]
        assert t.dtype == torch.long and t.unique().numel() == 1
    direct = reference.sample(dit, [1, 4, 9], seeds=[0, 1, 2], num_steps=3, guidance_scale=4.0)
    assert torch.equal(out, direct)
    # Timesteps decrease from near 1000 (DDIM "leading" spacing).
    ts = [int(c[1][0]) for c in rec.calls]
    assert ts == sorted(ts, reverse=True) and ts[0] > 600


def test_classifier_heldout_accuracy() -> None:
    from adacache.reference.classifier import evaluate_classifier

    clf = reference.load_classifier()
    assert evaluate_classifier(clf) >= 0.97
    feats = reference.features(data.load_split().test_images[:4])
    assert feats.shape == (4, 128)


def test_reference_model_generates_recognisable_digits(dit: nn.Module) -> None:
    # Cheap smoke test that the shipped weights are trained (full check in assets/TRAINING.md).
    labels = list(range(10))
    x = reference.sample(dit, labels, seeds=[100 + i for i in labels], num_steps=20, guidance_scale=4.0)
    pred = reference.predict(x)
    assert int((pred == torch.tensor(labels)).sum()) >= 8


def test_assets_present() -> None:
    root = Path(reference.__file__).parent / "assets"
    assert (root / "classifier" / "classifier.safetensors").is_file()
    assert (root / "dit" / "config.json").is_file()
