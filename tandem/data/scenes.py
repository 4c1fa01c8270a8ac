"""Synthetic scenes for training and evaluating the reference checkpoint.

Captions
    ``a <colour> <shape>`` objects (1 to 3) joined by relations, each relation linking neighbours in
    the caption: ``a red circle left of a blue square above a green triangle`` means the red circle
    is left of the blue square and the blue square is above the green triangle. Colours: red, green,
    blue, yellow, purple; shapes: circle, square, triangle; relations: left of, right of, above,
    below. A caption must fit the reasoning stage's prompt (``max_prompt_len - 2`` bytes, 62 for the
    small config), so some long three-object captions do not exist.

Layout (a function of the caption, so the reasoning stage can learn it exactly)
    Each object covers a FOOTPRINT x FOOTPRINT block of grid cells. Objects sit in the slots of a
    fixed 3x3 lattice with a pitch of PITCH cells (two empty cells between neighbours), centred in
    the grid. The caption's relations fix each object's slot relative to the others; on each axis
    the occupied slots are then centred in the lattice (a pair, which cannot be centred, takes the
    first two slots). Captions whose relations put two objects in one slot
    (``A left of B right of C``) are not valid scenes. Because the lattice is fixed, an object can
    only ever sit at one of nine cells. Row 0 stays clear of the lattice for the plan.

Scene tokens (one per grid cell, row-major, codebook ids)
    ``[0, h*w)``                     background at cell ``row * w + col``: every token says where it
                                     is, so the autoregressive reasoning stage always knows its cell
                                     whatever the prompt length;
    ``h*w + kind``                   an object of that kind (``shape * n_colours + colour``) centred
                                     on this cell (the other cells of its footprint are background
                                     tokens), so the refinement stage paints it over the cells
                                     around its token;
    ``h*w + n_kinds + kind * 9 + slot``
                                     a plan entry: "the caption's next object is of this kind and goes
                                     in this lattice slot". Row 0 starts with one entry per caption
                                     object, in caption order, and is painted as background. The
                                     reasoning stage makes its decisions there, reading the caption in
                                     order, before it writes the canvas; placing each object then
                                     copies its plan entry;
    the rest of the codebook         unused (painted black by :meth:`SceneVocabulary.render_tokens`).
    For the small config (16x16 grid, codebook 512): 256 background + 15 object + 135 plan ids.

Images
    Pillow draws each shape inside its footprint (a margin of ``cell_px // 4`` pixels) on a light
    grey background, without anti-aliasing, at the refinement stage's output resolution
    (``cell_px`` = 8 pixels per cell for small: 128x128, objects 20 pixels across).
    :meth:`SceneVocabulary.render_tokens` paints any token grid the same way (the ideal refinement
    stage), which :func:`test_render_matches_token_painting` checks.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tandem.config import ModelConfig
from tandem.errors import TandemError

# Mid-range colours (no channel at 0 or 255) so the refinement stage's sigmoid output never has
# to saturate; far apart so the checker's nearest-colour segmentation is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 48, 49),
    "green": (39, 164, 86),
    "blue": (41, 98, 214),
    "yellow": (236, 190, 20),
    "purple": (142, 68, 173),
}
BACKGROUND_RGB = (236, 236, 236)
UNUSED_RGB = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
# Slot offset (row, col) of the relation's subject from its object: "A left of B" puts A one
# slot to the left of B.
RELATIONS: dict[str, tuple[int, int]] = {
    "left of": (0, -1),
    "right of": (0, 1),
    "above": (-1, 0),
    "below": (1, 0),
}
MAX_OBJECTS = 3
FOOTPRINT = 3  # grid cells per object side; the object's token sits in the centre cell
PITCH = 5  # lattice spacing in cells: FOOTPRINT plus two empty cells
LATTICE = MAX_OBJECTS  # slots per lattice side: a chain of 3 objects spans at most 3 slots

_OBJECT_RE = "a (" + "|".join(COLOURS) + ") (" + "|".join(SHAPES) + ")"
_RELATION_RE = "(" + "|".join(RELATIONS) + ")"
_CAPTION_RE = re.compile(_OBJECT_RE + "(?: " + _RELATION_RE + " " + _OBJECT_RE + ")*")
_PIECE_RE = re.compile(_OBJECT_RE + "|" + _RELATION_RE)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str

    def describe(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A caption's objects, the relation between each neighbouring pair, and its layout."""

    objects: tuple[SceneObject, ...]
    relations: tuple[str, ...]  # relations[i] relates objects[i] (subject) to objects[i + 1]

    @property
    def caption(self) -> str:
        parts = [self.objects[0].describe()]
        for relation, obj in zip(self.relations, self.objects[1:]):
            parts += [relation, obj.describe()]
        return " ".join(parts)

    def slots(self) -> list[tuple[int, int]]:
        """Lattice slot (row, col) of every object, the last object at (0, 0)."""
        slots = [(0, 0)]
        for relation in reversed(self.relations):
            dr, dc = RELATIONS[relation]
            r, c = slots[0]
            slots.insert(0, (r + dr, c + dc))
        return slots

    @property
    def valid(self) -> bool:
        return len(set(self.slots())) == len(self.objects)


def parse_caption(caption: str) -> Scene:
    """Caption -> Scene; raises TandemError for text outside the caption grammar."""
    if not isinstance(caption, str) or _CAPTION_RE.fullmatch(caption) is None:
        raise TandemError(
            f"caption {caption!r} is not in the synthetic-scene grammar; write 1 to {MAX_OBJECTS} objects "
            f"'a <colour> <shape>' joined by relations, e.g. 'a red circle above a blue square' "
            f"(colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; relations: {', '.join(RELATIONS)})"
        )
    objects, relations = [], []
    for match in _PIECE_RE.finditer(caption):
        if match.group(1) is not None:
            objects.append(SceneObject(match.group(1), match.group(2)))
        else:
            relations.append(match.group(3))
    if len(objects) > MAX_OBJECTS:
        raise TandemError(f"caption {caption!r} has {len(objects)} objects; at most {MAX_OBJECTS} are supported")
    scene = Scene(tuple(objects), tuple(relations))
    if not scene.valid:
        raise TandemError(f"caption {caption!r} puts two objects in the same place; change one relation")
    return scene


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


HELDOUT_MODULUS = 8  # one caption in 8 is held out of training


def caption_split(caption: str) -> str:
    """``"heldout"`` or ``"train"``, from a hash of the caption text alone: stable across runs,
    machines and Python versions, and disjoint by construction."""
    return "heldout" if _stable_hash(caption) % HELDOUT_MODULUS == 0 else "train"


def all_scenes(max_caption_bytes: int) -> list[Scene]:
    """Every valid scene whose caption fits ``max_caption_bytes``, in a fixed order."""
    kinds = [SceneObject(c, s) for c in COLOURS for s in SHAPES]
    scenes = []
    for n in range(1, MAX_OBJECTS + 1):
        for objects in itertools.product(kinds, repeat=n):
            for relations in itertools.product(RELATIONS, repeat=n - 1):
                scene = Scene(objects, relations)
                if scene.valid and len(scene.caption.encode()) <= max_caption_bytes:
                    scenes.append(scene)
    return scenes


def sample_captions(rng: np.random.Generator, n: int, max_caption_bytes: int, split: str = "train") -> list[str]:
    """``n`` random captions of ``split``: 10% one object, 40% two, 50% three."""
    if split not in ("train", "heldout"):
        raise TandemError(f"split must be 'train' or 'heldout', got {split!r}")
    colours, shapes, relations = list(COLOURS), list(SHAPES), list(RELATIONS)
    out: list[str] = []
    while len(out) < n:
        count = int(rng.choice([1, 2, 3], p=[0.1, 0.4, 0.5]))
        objects = tuple(
            SceneObject(colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]) for _ in range(count)
        )
        scene = Scene(objects, tuple(relations[rng.integers(len(relations))] for _ in range(count - 1)))
        caption = scene.caption
        if scene.valid and len(caption.encode()) <= max_caption_bytes and caption_split(caption) == split:
            out.append(caption)
    return out


def heldout_captions(max_caption_bytes: int, per_count: int | None = None, seed: int = 2024) -> list[str]:
    """The evaluation set: every held-out caption (never seen in training), grouped by object
    count (1, 2, 3), or, given ``per_count``, up to that many of each count drawn with a fixed seed."""
    pool = [s.caption for s in all_scenes(max_caption_bytes) if caption_split(s.caption) == "heldout"]
    rng = np.random.Generator(np.random.PCG64(seed))
    chosen: list[str] = []
    for n in range(1, MAX_OBJECTS + 1):
        group = [c for c in pool if len(parse_caption(c).objects) == n]
        if per_count is None:
            chosen += group
            continue
        picks = rng.permutation(len(group))[:per_count]
        chosen += [group[i] for i in sorted(picks)]
    return chosen


class SceneVocabulary:
    """Scene <-> tokens <-> pixels for one model config's grid, codebook and image size."""

    def __init__(self, config: ModelConfig):
        s = config.scene
        self.config = config
        self.height, self.width = s.grid_height, s.grid_width
        self.codebook_size = s.codebook_size
        self.cell_px = config.refinement.upsample_factor
        self.max_caption_bytes = config.reasoning.max_prompt_len - 2  # BOS and BOI
        self.object_offset = self.height * self.width
        self.n_object_tokens = len(SHAPES) * len(COLOURS)
        self.plan_offset = self.object_offset + self.n_object_tokens
        self.n_plan_tokens = self.n_object_tokens * LATTICE * LATTICE
        lattice_cells = FOOTPRINT + PITCH * (LATTICE - 1)
        used = self.plan_offset + self.n_plan_tokens
        problems = []
        if min(self.height, self.width) < lattice_cells + 1:  # + the plan row
            problems.append(
                f"a grid of at least {lattice_cells + 1}x{lattice_cells + 1} cells (has {self.height}x{self.width})"
            )
        if used > self.codebook_size:
            problems.append(f"a codebook of at least {used} entries (has {self.codebook_size})")
        if self.cell_px < 4:
            problems.append(f"at least 4 pixels per grid cell (has {self.cell_px})")
        if problems:
            raise TandemError(
                f"config {config.name!r} cannot hold synthetic scenes: they need " + " and ".join(problems)
                + "; use the small config (16x16 grid, codebook 512) or a larger one"
            )
        # Top-left cell of lattice slot 0 on each axis: the lattice is centred in the grid, below
        # the plan row.
        self.lattice_origin = (max(1, (self.height - lattice_cells) // 2), (self.width - lattice_cells) // 2)

    # --- tokens -------------------------------------------------------------------------------
    def background_token(self, row: int, col: int) -> int:
        return row * self.width + col

    def object_token(self, obj: SceneObject) -> int:
        return self.object_offset + SHAPES.index(obj.shape) * len(COLOURS) + list(COLOURS).index(obj.colour)

    def plan_token(self, obj: SceneObject, slot: tuple[int, int]) -> int:
        """The plan entry "``obj`` goes in lattice slot ``slot`` (row, col)"."""
        kind = self.object_token(obj) - self.object_offset
        return self.plan_offset + (kind * LATTICE + slot[0]) * LATTICE + slot[1]

    def describe_token(self, token: int) -> tuple:
        """("background", row, col) | ("object", colour, shape) | ("plan", colour, shape, (slot row,
        slot col)) | ("unused",)"""
        token = int(token)
        if 0 <= token < self.object_offset:
            return ("background", token // self.width, token % self.width)
        kind = token - self.object_offset
        if 0 <= kind < self.n_object_tokens:
            shape, colour = divmod(kind, len(COLOURS))
            return ("object", list(COLOURS)[colour], SHAPES[shape])
        entry = token - self.plan_offset
        if 0 <= entry < self.n_plan_tokens:
            kind, slot = divmod(entry, LATTICE * LATTICE)
            shape, colour = divmod(kind, len(COLOURS))
            return ("plan", list(COLOURS)[colour], SHAPES[shape], divmod(slot, LATTICE))
        return ("unused",)

    @property
    def slot_cells(self) -> list[tuple[int, int]]:
        """The nine cells (row, col) that can hold an object token (footprint centres), row-major."""
        r0, c0 = self.lattice_origin
        centre = FOOTPRINT // 2
        return [(r0 + centre + PITCH * i, c0 + centre + PITCH * j) for i in range(LATTICE) for j in range(LATTICE)]

    def placements(self, scene: Scene) -> list[tuple[int, int]]:
        """Top-left grid cell (row, col) of every object: its lattice slot, occupied slots centred."""
        slots = scene.slots()
        placed = [[0, 0] for _ in slots]
        for axis in (0, 1):
            values = [slot[axis] for slot in slots]
            low, span = min(values), max(values) - min(values) + 1
            first = (LATTICE - span) // 2
            for p, v in zip(placed, values):
                p[axis] = self.lattice_origin[axis] + PITCH * (first + v - low)
        return [(r, c) for r, c in placed]

    def scene_tokens(self, scene: Scene) -> np.ndarray:
        """The scene as codebook ids [h, w] int32: the plan in row 0, objects on the lattice."""
        rows, cols = np.indices((self.height, self.width))
        tokens = (rows * self.width + cols).astype(np.int32)
        centre = FOOTPRINT // 2
        r0, c0 = self.lattice_origin
        for k, (obj, (top, left)) in enumerate(zip(scene.objects, self.placements(scene))):
            tokens[0, k] = self.plan_token(obj, ((top - r0) // PITCH, (left - c0) // PITCH))
            tokens[top + centre, left + centre] = self.object_token(obj)
        return tokens

    def caption_tokens(self, caption: str) -> np.ndarray:
        return self.scene_tokens(self.parse(caption))

    def parse(self, caption: str) -> Scene:
        scene = parse_caption(caption)
        if len(caption.encode()) > self.max_caption_bytes:
            raise TandemError(
                f"caption {caption!r} is {len(caption.encode())} bytes; the {self.config.name} config allows "
                f"{self.max_caption_bytes}"
            )
        return scene

    # --- pixels -------------------------------------------------------------------------------
    def _draw(self, draw: ImageDraw.ImageDraw, obj: SceneObject, top_px: int, left_px: int) -> None:
        size = FOOTPRINT * self.cell_px
        m = self.cell_px // 4
        x0, y0, x1, y1 = left_px + m, top_px + m, left_px + size - 1 - m, top_px + size - 1 - m
        fill = COLOURS[obj.colour]
        if obj.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        elif obj.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        else:  # triangle, apex up
            draw.polygon([(x0, y1), (x1, y1), (left_px + size // 2, y0)], fill=fill)

    def _paint(self, objects: list[tuple[SceneObject, int, int]], unused: list[tuple[int, int]] = ()) -> np.ndarray:
        px = self.cell_px
        image = Image.new("RGB", (self.width * px, self.height * px), BACKGROUND_RGB)
        draw = ImageDraw.Draw(image)
        for row, col in unused:
            draw.rectangle([col * px, row * px, (col + 1) * px - 1, (row + 1) * px - 1], fill=UNUSED_RGB)
        for obj, top, left in objects:
            self._draw(draw, obj, top * px, left * px)
        return np.asarray(image, dtype=np.uint8).copy()

    def render(self, scene: Scene) -> np.ndarray:
        """The scene drawn with Pillow: [H, W, 3] uint8."""
        return self._paint([(obj, top, left) for obj, (top, left) in zip(scene.objects, self.placements(scene))])

    def render_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """The ideal painting of a token grid [h, w] -> [H, W, 3] uint8 (what a perfect refinement
        stage would produce; the token-level checker reads this): each object token's shape drawn
        over the footprint centred on its cell (clipped at the grid's edge), in raster order, plan
        tokens as background (the plan is not painted), unused tokens as black cells."""
        tokens = np.asarray(tokens)
        if tokens.shape != (self.height, self.width):
            raise TandemError(f"scene tokens must have shape [{self.height}, {self.width}], got {list(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= self.codebook_size:
            raise TandemError(f"scene tokens must be in [0, {self.codebook_size})")
        objects, unused = [], []
        for (row, col), token in np.ndenumerate(tokens):
            kind = self.describe_token(token)
            if kind[0] == "object":
                objects.append((SceneObject(kind[1], kind[2]), row - FOOTPRINT // 2, col - FOOTPRINT // 2))
            elif kind[0] == "unused":
                unused.append((row, col))
        return self._paint(objects, unused)
