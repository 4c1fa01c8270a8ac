"""Synthetic scenes: captions, the scene-token grid the reasoning stage writes, and the image the
refinement stage paints. Deterministic, generated on the fly, nothing downloaded."""

from tandem.data.scenes import (
    COLOURS,
    RELATIONS,
    SHAPES,
    Scene,
    SceneObject,
    SceneVocabulary,
    caption_split,
    parse_caption,
    sample_captions,
)

__all__ = [
    "COLOURS",
    "RELATIONS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "SceneVocabulary",
    "caption_split",
    "parse_caption",
    "sample_captions",
]
