"""One generation request, checked, and the generator that answers it — no Ray here.

The Ray Serve deployment (:mod:`adacache.serve.app`) is a thin HTTP shell around
:class:`Generator`, so what a request means and what it answers is testable without a server.
A request is one explicit adacache request: its caches start empty, are its own, and its
statistics are read back from the session that ran it.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

#: The most steps a request may ask for (the reference scheduler has 1000 training steps).
MAX_STEPS = 1000
#: The most images one request may ask for.
MAX_IMAGES = 64
OUTPUTS = ("png", "tensor")
_FIELDS = ("class_labels", "seeds", "num_inference_steps", "guidance_scale", "output")


@dataclass(frozen=True)
class GenerationRequest:
    """What one request asks for. Build it with :meth:`from_json`, which checks every field."""

    class_labels: tuple[int, ...]
    seeds: tuple[int, ...]
    num_inference_steps: int = 50
    guidance_scale: float = 4.0
    output: str = "png"

    @classmethod
    def from_json(cls, body: Any, num_classes: int) -> "GenerationRequest":
        """Parse a JSON body: ``class_labels`` (a list of class indices, or one index),
        ``seeds`` (one per label; default 0, 1, ...), ``num_inference_steps``,
        ``guidance_scale`` and ``output`` (``png`` or ``tensor``).

        Raises:
            InputError: naming the field that is wrong, what it must be and what it got.
        """
        if not isinstance(body, dict):
            raise InputError(f"the request body must be a JSON object with fields {list(_FIELDS)}, got {type(body).__name__}")
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise InputError(f"unknown field(s) {unknown}; a request may carry {list(_FIELDS)}")
        labels = body.get("class_labels")
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels = [labels]
        if not (isinstance(labels, list) and labels and all(_is_int(v) and 0 <= v < num_classes for v in labels)):
            raise InputError(f"class_labels must be a class index or a non-empty list of them, each in 0..{num_classes - 1}, "
                             f"got {body.get('class_labels')!r}")
        if len(labels) > MAX_IMAGES:
            raise InputError(f"a request may ask for at most {MAX_IMAGES} images, got {len(labels)} class_labels")
        seeds = body.get("seeds", list(range(len(labels))))
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not (isinstance(seeds, list) and len(seeds) == len(labels) and all(_is_int(s) and 0 <= s < 2**63 for s in seeds)):
            raise InputError(f"seeds must be one non-negative integer per class label ({len(labels)}), got {body.get('seeds')!r}")
        steps = body.get("num_inference_steps", 50)
        if not (_is_int(steps) and 1 <= steps <= MAX_STEPS):
            raise InputError(f"num_inference_steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
        guidance = body.get("guidance_scale", 4.0)
        if not (isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and 0.0 <= guidance <= 50.0):
            raise InputError(f"guidance_scale must be a number in 0..50, got {guidance!r}")
        output = body.get("output", "png")
        if output not in OUTPUTS:
            raise InputError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
        return cls(tuple(labels), tuple(seeds), int(steps), float(guidance), output)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationResult:
    """What a request gets back: its images (PNG, base64) or their pixel values, and the
    statistics of its own cache."""

    images: list[str] | None
    tensor: list[Any] | None
    shape: list[int]
    policy: str
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = {"shape": self.shape, "policy": self.policy, "stats": self.stats, "seconds": round(self.seconds, 4)}
        if self.images is not None:
            out["images"] = self.images
        if self.tensor is not None:
            out["tensor"] = self.tensor
        return out


class Generator:
    """The shipped reference model (a class-conditional DiT on 16x16 digits, DDIM with
    classifier-free guidance), compiled with ``policy``. Thread-safe: the runtime gives each
    thread its own session, and each request announces itself, so no request ever reads
    another's cache."""

    def __init__(self, policy: str = "FORA(interval=3)", threads: int | None = None, warm_up: bool = True) -> None:
        import torch

        import adacache
        from adacache.policies.parse import parse_policy
        from adacache.reference import NUM_CLASSES, load_reference_model

        if threads is not None:
            torch.set_num_threads(threads)
        self.policy = parse_policy(policy)
        self.model = adacache.compile(load_reference_model(), self.policy)
        self.num_classes = NUM_CLASSES
        if warm_up:
            # Capture now, not in the first user's request (and learn whether batching is safe).
            self._run([0], [0], 2, 4.0)

    def parse(self, body: Any) -> GenerationRequest:
        """A checked request from a JSON body (see :meth:`GenerationRequest.from_json`)."""
        return GenerationRequest.from_json(body, self.num_classes)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one request to its images, with its own caches and statistics."""
        return self.generate_many([request])[0]

    @property
    def batch_independent(self) -> bool:
        """Whether a request's images are the same in a batch as alone: the policy decides by
        its schedule alone (no in-graph score reads the batch's features; a gated policy
        reuses only when every row agrees, so batch-mates would change each other's
        decisions) and does not own the sampling loop."""
        if self.policy.owns_trajectory:
            return False
        programs = self.model.adacache.programs
        if not programs:
            return False  # not captured yet: nothing known, nothing risked
        return not any(spec.kind == "score" for program in programs for spec in program.layout.signals)

    def generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answer several requests. Those with the same step count and guidance share one
        call of the model when that changes no request's images (:attr:`batch_independent`);
        otherwise each runs alone. Each answer says how many requests shared its call."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        shareable = self.batch_independent
        for index, request in enumerate(requests):
            key = (request.num_inference_steps, request.guidance_scale) if shareable else (index,)
            groups.setdefault(key, []).append(index)
        results: list[GenerationResult | None] = [None] * len(requests)
        for members in groups.values():
            shared = [requests[i] for i in members]
            images, stats, seconds = self._run(
                [label for r in shared for label in r.class_labels], [seed for r in shared for seed in r.seeds],
                shared[0].num_inference_steps, shared[0].guidance_scale)
            start = 0
            for index, request in zip(members, shared):
                own = images[start : start + len(request.class_labels)]
                start += len(request.class_labels)
                results[index] = GenerationResult(
                    images=[_png(image) for image in own] if request.output == "png" else None,
                    tensor=own.tolist() if request.output == "tensor" else None,
                    shape=list(own.shape),
                    policy=self.policy.describe(),
                    stats={**stats, "requests_in_call": len(members)},
                    seconds=seconds,
                )
        return [r for r in results if r is not None]

    def _run(self, labels: list[int], seeds: list[int], steps: int, guidance: float) -> tuple[Any, dict[str, Any], float]:
        import adacache
        from adacache.reference import sample

        started = time.perf_counter()
        # A session of its own: its counters are this call's, not those of every request
        # the same worker thread served before.
        with adacache.session(self.model) as session:
            images = sample(self.model, labels, seeds=seeds, num_steps=steps, guidance_scale=guidance)
        summary = adacache.summary(self.model, session)
        reused = [any(bool(v) for v in row["reused"].values()) for row in summary.per_step]
        stats = {"steps": len(reused), "reused_steps": sum(reused), "hit_rate": summary.hit_rate,
                 "flops_skipped": summary.flops_skipped, "cache_mib": summary.cache_bytes / 2**20}
        return images, stats, time.perf_counter() - started


def _png(image: Any) -> str:
    """One (C, H, W) image in [-1, 1] as a base64 PNG (grayscale for one channel)."""
    from PIL import Image

    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().byte()
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
