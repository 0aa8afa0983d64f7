"""Train the reference models on CPU.

Usage::

    python -m adacache.reference.train --out DIR [--minutes N] [--seed S] [--steps K]
    python -m adacache.reference.train --model classifier --out DIR

The DiT run writes ``DIR/config.json`` + ``DIR/diffusion_pytorch_model.safetensors`` (EMA weights,
loadable with ``DiTTransformer2DModel.from_pretrained(DIR)``), ``DIR/scheduler_config.json`` (a
``DDIMScheduler``) and ``DIR/training_log.json``.  The run is deterministic for a seed as long as it
is not cut short by ``--minutes`` (a wall-clock safety cap) and runs with the same thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_split, random_shift
from .model import NULL_CLASS, build_dit, build_scheduler, disable_builtin_label_dropout

__all__ = ["train_dit", "evaluate_reference", "save_grid", "main"]


def _lr_at(step: int, total: int, base_lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    # Linear warm-up then cosine decay: short runs profit from a high peak lr and a low final lr.
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_p = list(ema.parameters())
    p = [q.detach() for q in model.parameters()]
    torch._foreach_lerp_(ema_p, p, 1.0 - decay)


def _save_dit(ema: nn.Module, out: Path, log: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    build_scheduler("ddim").save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")


def train_dit(
    out: Path,
    *,
    steps: int = 8000,
    minutes: float = 50.0,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 200,
    ema_decay: float = 0.999,
    label_dropout: float = 0.1,
    threads: int = 1,
    save_every: int = 500,
    max_shift: int = 0,
    init_from: Path | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the reference DiT with the DiT-paper objective (epsilon MSE, linear betas, CFG label dropout).

    Args:
        out: output directory (diffusers layout).
        steps: optimiser steps (also fixes the learning-rate schedule).
        minutes: wall-clock cap; training stops early (and says so in the log) when reached.
        seed: seed of initialisation, batches, timesteps and noise.
        batch_size: images per step.
        lr: peak AdamW learning rate.
        warmup: linear warm-up steps.
        ema_decay: EMA decay of the saved weights.
        label_dropout: probability of replacing a label by the null class (for CFG).
        threads: ``torch.set_num_threads`` value.
        save_every: steps between intermediate checkpoints (so an interrupted run leaves usable weights).
        max_shift: random-shift augmentation in pixels (0 = off).
        init_from: optional diffusers model directory whose weights start the run (continued training;
            the optimiser state is not restored).
        stop_after: stop after this many steps of the ``steps``-long schedule (reproduces a run that
            ``minutes`` cut short, deterministically).

    Returns:
        The training log written to ``out/training_log.json``.
    """
    from tqdm import tqdm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    split = load_split(seed=0)  # the split is fixed; the run seed only drives training randomness
    images, labels = split.train_images, split.train_labels
    n = images.shape[0]

    model = build_dit()
    if init_from is not None:
        from diffusers import DiTTransformer2DModel

        src = DiTTransformer2DModel.from_pretrained(str(init_from), low_cpu_mem_usage=False)
        model.load_state_dict(src.state_dict())
    disable_builtin_label_dropout(model)
    model.train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())

    sched = build_scheduler("ddpm")
    alphas_cumprod = sched.alphas_cumprod.to(torch.float32)
    n_t = sched.config.num_train_timesteps

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.999))
    t_start = time.monotonic()
    losses: list[float] = []
    log: dict[str, Any] = {}
    perm = torch.randperm(n, generator=gen)
    cursor = 0
    stopped_early = False
    step = 0
    bar = tqdm(range(steps), desc="dit", mininterval=20.0)
    for step in bar:
        if (time.monotonic() - t_start) > minutes * 60.0 or (stop_after is not None and step >= stop_after):
            stopped_early = True
            break
        # Epoch-wise shuffling without replacement.
        if cursor + batch_size > n:
            perm = torch.randperm(n, generator=gen)
            cursor = 0
        idx = perm[cursor : cursor + batch_size]
        cursor += batch_size
        x0 = images[idx]
        if max_shift > 0:
            x0 = random_shift(x0, max_shift, generator=gen)
        y = labels[idx].clone()
        drop = torch.rand(batch_size, generator=gen) < label_dropout
        y[drop] = NULL_CLASS
        t = torch.randint(0, n_t, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup)
        pred = model(hidden_states=xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred[:, : x0.shape[1]], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        # EMA warm-up so early checkpoints are not dominated by the random initialisation.
        _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if save_every and (step + 1) % save_every == 0:
            log = _make_log(step + 1, steps, t_start, losses, n_params, seed, batch_size, lr, threads, False)
            _save_dit(ema, out, log)
            print(f"[step {step + 1}] saved, loss(avg 200)={log['final_loss_avg200']:.4f}", flush=True)
    done = step if stopped_early else steps
    log = _make_log(done, steps, t_start, losses, n_params, seed, batch_size, lr, threads, stopped_early)
    _save_dit(ema, out, log)
    return log


def _make_log(
    done: int,
    planned: int,
    t_start: float,
    losses: list[float],
    n_params: int,
    seed: int,
    batch_size: int,
    lr: float,
    threads: int,
    stopped_early: bool,
) -> dict[str, Any]:
    tail = losses[-200:] or [float("nan")]
    return {
        "steps_done": done,
        "steps_planned": planned,
        "stopped_before_planned_steps": stopped_early,
        "train_seconds": round(time.monotonic() - t_start, 1),
        "final_loss_avg200": sum(tail) / len(tail),
        "loss_curve_every_100": [round(sum(losses[i : i + 100]) / len(losses[i : i + 100]), 5) for i in range(0, len(losses), 100)],
        "n_params": n_params,
        "seed": seed,
        "batch_size": batch_size,
        "peak_lr": lr,
        "threads": threads,
    }


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 4, pad: int = 2) -> None:
    """Save images ``(N, 1, H, W)`` in ``[-1, 1]`` as a PNG grid with ``nrow`` images per row."""
    import numpy as np
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    n, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    hs, ws = h * scale, w * scale
    canvas = np.full((rows * (hs + pad) + pad, nrow * (ws + pad) + pad), 128, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        tile = np.kron(x[i], np.ones((scale, scale), dtype=np.uint8))  # nearest-neighbour upscaling
        canvas[pad + r * (hs + pad) : pad + r * (hs + pad) + hs, pad + c * (ws + pad) : pad + c * (ws + pad) + ws] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def evaluate_reference(
    model_dir: Path,
    grid: Path | None = None,
    per_class: int = 20,
    num_steps: int = 50,
    scales: tuple[float, ...] = (4.0, 1.5),
    threads: int = 2,
) -> dict[str, Any]:
    """Measure the quality bar of a trained DiT: classifier accuracy and FD-digits of its samples.

    Samples ``per_class`` images of every class (seeds ``1000 + i``) with DDIM ``num_steps`` at each CFG
    scale.  Optionally writes a 10x10 grid (row = class, CFG 4.0, seeds ``5000 + i``) to ``grid``.
    """
    from adacache.eval.metrics import class_accuracy, fd_digits
    from adacache.reference import load_reference_model, load_reference_scheduler
    from adacache.reference.classifier import evaluate_classifier
    from adacache.reference.sampling import sample

    torch.set_num_threads(threads)
    model = load_reference_model(model_dir)
    sched = load_reference_scheduler(model_dir)
    res: dict[str, Any] = {"classifier_heldout_accuracy": evaluate_classifier()}
    labels = torch.arange(10).repeat_interleave(per_class)
    seeds = [1000 + i for i in range(labels.numel())]
    for g in scales:
        t0 = time.monotonic()
        x = sample(model, labels, seeds=seeds, num_steps=num_steps, guidance_scale=g, scheduler=sched)
        res[f"sample_accuracy_cfg{g}"] = class_accuracy(x, labels)
        res[f"fd_digits_cfg{g}"] = fd_digits(x)
        res[f"sampling_seconds_cfg{g}"] = round(time.monotonic() - t0, 1)
    # FD-digits of as many real held-out digits, as a floor for comparison.
    res["fd_digits_real_heldout_vs_all"] = fd_digits(load_split().test_images[: labels.numel()])
    if grid is not None:
        gl = torch.arange(10).repeat_interleave(10)
        gx = sample(model, gl, seeds=[5000 + i for i in range(100)], num_steps=num_steps, guidance_scale=4.0, scheduler=sched)
        save_grid(gx, grid)
    return res


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", choices=("dit", "classifier"), default="dit")
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-clock cap (DiT)")
    ap.add_argument("--steps", type=int, default=8000, help="optimiser steps (DiT)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stop-after", type=int, default=None, help="stop after K steps of the --steps schedule")
    ap.add_argument("--init-from", type=Path, default=None, help="continue from these DiT weights")
    ap.add_argument("--evaluate", action="store_true", help="evaluate the DiT in --out instead of training")
    ap.add_argument("--grid", type=Path, default=None, help="with --evaluate: write a 10x10 sample grid PNG")
    args = ap.parse_args(argv)
    if args.evaluate:
        print(json.dumps(evaluate_reference(args.out, args.grid, threads=args.threads), indent=2))
        return
    if args.model == "classifier":
        from .classifier import train_classifier

        acc = train_classifier(args.out, seed=args.seed, threads=args.threads)
        print(f"classifier held-out accuracy: {acc:.4f}")
        return
    log = train_dit(
        args.out,
        steps=args.steps,
        minutes=args.minutes,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        init_from=args.init_from,
        stop_after=args.stop_after,
    )
    print(json.dumps({k: v for k, v in log.items() if k != "loss_curve_every_100"}, indent=2))


if __name__ == "__main__":
    main()
