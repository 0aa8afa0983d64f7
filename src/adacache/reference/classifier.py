"""A small CNN digit classifier for the 16x16 digits, used as the evaluation "perceptual" network.

No LPIPS / Inception weights can be downloaded in this environment, so this classifier, trained on
the real digits, supplies the feature space for the perceptual distance and the Fréchet distance
(FD-digits) in :mod:`adacache.eval.metrics`, and judges class accuracy of generated samples.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import NUM_CLASSES, load_split, random_shift

__all__ = [
    "DigitClassifier",
    "CLASSIFIER_DIR",
    "load_classifier",
    "features",
    "predict",
    "train_classifier",
    "evaluate_classifier",
]

CLASSIFIER_DIR = Path(__file__).parent / "assets" / "classifier"
_WEIGHTS = "classifier.safetensors"
FEATURE_DIM = 128


class DigitClassifier(nn.Module):
    """Conv(32)-Conv(32)-pool-Conv(64)-Conv(64)-pool-FC(128)-FC(10) for 1x16x16 inputs in [-1, 1]."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(64 * 4 * 4, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer (post-ReLU) features, shape ``(N, feature_dim)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape ``(N, num_classes)``."""
        return self.head(self.body(x))


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[-2:] != (16, 16) or images.shape[1] != 1:
        raise ValueError(f"expected (N, 1, 16, 16) images in [-1, 1], got {tuple(images.shape)}")
    return images.float()


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load the shipped classifier weights (safetensors) in eval mode.

    Args:
        path: a directory containing ``classifier.safetensors`` or the file itself; defaults to the
            shipped asset.
    """
    from safetensors.torch import load_file

    p = Path(path) if path is not None else CLASSIFIER_DIR
    if p.is_dir():
        p = p / _WEIGHTS
    model = DigitClassifier()
    model.load_state_dict(load_file(str(p)))
    return model.eval()


@lru_cache(maxsize=1)
def _default_classifier() -> DigitClassifier:
    return load_classifier()


@torch.no_grad()
def features(images: torch.Tensor, model: DigitClassifier | None = None, batch_size: int = 512) -> torch.Tensor:
    """Penultimate-layer classifier features of ``images`` ((N,1,16,16) or (N,16,16), range [-1, 1]).

    Args:
        images: input images.
        model: classifier to use; defaults to the shipped one (loaded once and cached).
        batch_size: images per forward pass.

    Returns:
        float32 tensor ``(N, 128)``.
    """
    m = model if model is not None else _default_classifier()
    x = _as_batch(images)
    return torch.cat([m.features(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def predict(images: torch.Tensor, model: DigitClassifier | None = None, batch_size: int = 512) -> torch.Tensor:
    """Predicted class index of every image, int64 tensor ``(N,)``."""
    m = model if model is not None else _default_classifier()
    x = _as_batch(images)
    return torch.cat([m(x[i : i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)])


def evaluate_classifier(model: DigitClassifier | None = None, seed: int = 0) -> float:
    """Accuracy on the held-out split of :func:`adacache.reference.data.load_split` (same ``seed``)."""
    split = load_split(seed=seed)
    pred = predict(split.test_images, model)
    return float((pred == split.test_labels).float().mean())


def train_classifier(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    threads: int = 1,
) -> float:
    """Train the classifier on the train split (with ±1 px shift augmentation) and save it.

    Args:
        out: output directory (``classifier.safetensors`` is written there); defaults to the asset dir.
        seed: seed of initialisation and batching.
        epochs: passes over the 1437 training digits.
        batch_size: images per step.
        lr: AdamW learning rate (cosine-decayed to 0).
        threads: ``torch.set_num_threads`` value.

    Returns:
        Held-out accuracy of the trained classifier.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    split = load_split(seed=0)
    x, y = split.train_images, split.train_labels
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (x.shape[0] + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc="classifier"):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            # Shifts make the features robust to the slight mis-centring of generated digits.
            xb = random_shift(x[idx], 1, generator=gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc = evaluate_classifier(model)
    out_dir = Path(out) if out is not None else CLASSIFIER_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / _WEIGHTS))
    return acc
