"""Capture: trace the user's model into a flat FX graph with ``torch.export``."""

from .export import CapturedGraph, InputSignature, capture, signature_of

__all__ = ["CapturedGraph", "InputSignature", "capture", "signature_of"]
