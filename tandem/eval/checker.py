"""A deterministic checker: does an image show what its caption says?

1. Segmentation: every pixel takes the nearest palette colour (background or one of the object
   colours); pixels far from every palette colour count as background.
2. Objects: connected components (scipy.ndimage.label, 4-connectivity) of each object colour
   with at least ``2 * cell_px**2`` pixels; smaller specks are ignored.
3. Shape, from two features that survive a soft-edged painting: the share of the component's
   pixels in the lower half of its bounding box (an apex-up triangle holds 3/4 of its area
   there, a circle or square 1/2) and its fill of the bounding box (a square 1.0, a circle pi/4).
   Thresholds sit midway.
4. Caption: the image passes when it has exactly the caption's objects (colour and shape) and an
   assignment of components to caption objects satisfies every relation by centroids (``left of``:
   the subject's centroid at least one cell to the left of the object's; likewise the others).

Token grids are checked by painting them with the ideal painter
(:meth:`SceneVocabulary.render_tokens`) and checking that image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from tandem.data.scenes import BACKGROUND_RGB, COLOURS, Scene, SceneVocabulary, parse_caption
from tandem.errors import TandemError

MAX_COLOUR_DISTANCE = 90.0  # RGB distance beyond which a pixel matches no palette colour
SQUARE_MIN_FILL = 0.89  # midway between a square (1.0) and a circle (pi/4)
TRIANGLE_MIN_LOWER_SHARE = 0.625  # midway between a triangle (3/4) and a circle or square (1/2)

_PALETTE = np.array([BACKGROUND_RGB, *COLOURS.values()], dtype=np.float32)  # index 0: background
_COLOUR_NAMES = list(COLOURS)


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    area: int
    fill: float
    lower_share: float  # share of the pixels in the lower half of the bounding box
    centroid: tuple[float, float]  # (x, y) in pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)


@dataclass
class CheckResult:
    caption: str
    passed: bool
    reason: str
    detected: list[DetectedObject] = field(default_factory=list)


def classify_shape(fill: float, lower_share: float) -> str:
    if lower_share >= TRIANGLE_MIN_LOWER_SHARE:
        return "triangle"
    if fill >= SQUARE_MIN_FILL:
        return "square"
    return "circle"


def segment(image: np.ndarray, cell_px: int) -> list[DetectedObject]:
    """Objects in an [H, W, 3] uint8 image, ordered by colour then position (deterministic)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise TandemError(f"the checker reads [H, W, 3] uint8 images, got {image.dtype} {list(image.shape)}")
    pixels = image.astype(np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None, :, :], axis=-1)  # [H, W, P]
    nearest = distance.argmin(axis=-1)
    nearest[distance.min(axis=-1) > MAX_COLOUR_DISTANCE] = 0
    min_area = 2 * cell_px * cell_px
    found = []
    for index, colour in enumerate(_COLOUR_NAMES, start=1):
        labels, count = ndimage.label(nearest == index)
        for component in range(1, count + 1):
            ys, xs = np.nonzero(labels == component)
            area = len(xs)
            if area < min_area:
                continue
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
            fill = area / float((x1 - x0 + 1) * (y1 - y0 + 1))
            middle = (y0 + y1) / 2.0  # a row on the middle line counts half to each side
            lower_share = (np.sum(ys > middle) + 0.5 * np.sum(ys == middle)) / area
            found.append(
                DetectedObject(
                    colour=colour,
                    shape=classify_shape(fill, lower_share),
                    area=area,
                    fill=round(fill, 4),
                    lower_share=round(float(lower_share), 4),
                    centroid=(float(xs.mean()), float(ys.mean())),
                    bbox=(x0, y0, x1, y1),
                )
            )
    return found


def relation_holds(relation: str, subject: DetectedObject, obj: DetectedObject, margin: float) -> bool:
    (sx, sy), (ox, oy) = subject.centroid, obj.centroid
    if relation == "left of":
        return sx <= ox - margin
    if relation == "right of":
        return sx >= ox + margin
    if relation == "above":
        return sy <= oy - margin
    if relation == "below":
        return sy >= oy + margin
    raise TandemError(f"unknown relation {relation!r}")


def check_scene(scene: Scene, detected: list[DetectedObject], cell_px: int) -> CheckResult:
    caption = scene.caption
    wanted = [(o.colour, o.shape) for o in scene.objects]
    if len(detected) != len(wanted):
        seen = ", ".join(f"{d.colour} {d.shape}" for d in detected) or "nothing"
        return CheckResult(caption, False, f"found {len(detected)} objects ({seen}), caption has {len(wanted)}", detected)
    kinds_match = False
    for order in itertools.permutations(range(len(detected))):
        assigned = [detected[i] for i in order]
        if [(d.colour, d.shape) for d in assigned] != wanted:
            continue
        kinds_match = True
        if all(
            relation_holds(rel, assigned[i], assigned[i + 1], margin=float(cell_px))
            for i, rel in enumerate(scene.relations)
        ):
            return CheckResult(caption, True, "ok", detected)
    if not kinds_match:
        seen = ", ".join(f"{d.colour} {d.shape}" for d in detected)
        return CheckResult(caption, False, f"objects found ({seen}) are not the caption's", detected)
    return CheckResult(caption, False, "objects are right but a relation does not hold", detected)


def check_image(caption: str, image: np.ndarray, cell_px: int) -> CheckResult:
    return check_scene(parse_caption(caption), segment(image, cell_px), cell_px)


def check_tokens(caption: str, tokens: np.ndarray, vocab: SceneVocabulary) -> CheckResult:
    return check_image(caption, vocab.render_tokens(tokens), vocab.cell_px)
