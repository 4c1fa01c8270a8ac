"""Compositional accuracy: a deterministic caption checker and the held-out evaluation."""

from tandem.eval.checker import CheckResult, DetectedObject, check_image, check_tokens, segment

__all__ = ["CheckResult", "DetectedObject", "check_image", "check_tokens", "segment"]
