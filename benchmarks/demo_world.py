"""A procedural image-caption world: small RGB images of objects with attributes.

Every image shows ``count`` identical objects (1-4) with a shape, a colour, a texture
and a size, placed at a position (one object) or in the cells of a 2x2 grid (several
objects), on a plain background. Attributes are sampled from a numpy ``Generator``
(:func:`sample_attributes`), then rendered in one vectorised pass per shape and object
slot (:func:`render`); captions are written from the same attributes through several
templates (:func:`caption`). Everything is deterministic given the seed.

The *base world* is what the demo CLIP model was pre-trained on: one object, base
shapes, base colours, base textures, both sizes, any position, grey-scale backgrounds,
captions naming shape, colour and texture ("a photo of a red striped circle.").
Everything else (counting, positions, novel textures, shades, outline style, coloured
backgrounds, noise) is outside it and used by the demo stream.

Style shifts are render options: ``outline=True`` draws only the contour of each object
(no texture), ``noise_std`` adds Gaussian pixel noise; coloured backgrounds
(:data:`NEW_BACKGROUNDS`) are a third shift, chosen through the ``background``
attribute.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np

# ----------------------------------------------------------------- vocabularies
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "crescent")
SHAPE_PLURALS: dict[str, str] = {s: (s + "es" if s.endswith("ss") else s + "s") for s in SHAPES}

#: Object colours (RGB). The first eight are the base colours of pre-training; the
#: shades are close variants used only by the fine-grained stream task.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 30),
    "green": (35, 165, 55),
    "cyan": (30, 200, 215),
    "blue": (35, 65, 215),
    "purple": (135, 45, 185),
    "pink": (245, 125, 185),
    "dark red": (135, 25, 25),
    "light red": (245, 120, 110),
    "dark green": (20, 100, 35),
    "light green": (125, 220, 125),
    "dark blue": (25, 35, 125),
    "light blue": (120, 150, 250),
}
BASE_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHADE_COLOURS: tuple[str, ...] = ("dark red", "light red", "dark green", "light green", "dark blue", "light blue")

#: Surface patterns. The first four are seen in pre-training, the rest are novel.
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "wavy", "gridded", "gradient", "speckled")
BASE_TEXTURES: tuple[str, ...] = TEXTURES[:4]
NOVEL_TEXTURES: tuple[str, ...] = TEXTURES[4:]

SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")

#: Backgrounds (RGB): grey levels in the base world, colours as a style shift.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238),
    "light gray": (196, 196, 196),
    "gray": (150, 150, 150),
    "dark gray": (90, 90, 90),
    "black": (24, 24, 24),
    "olive": (110, 110, 40),
    "navy": (30, 35, 85),
    "maroon": (90, 30, 45),
    "teal": (30, 100, 100),
    "beige": (225, 205, 165),
    "lavender": (195, 180, 230),
}
BASE_BACKGROUNDS: tuple[str, ...] = ("white", "light gray", "gray", "dark gray", "black")
NEW_BACKGROUNDS: tuple[str, ...] = ("olive", "navy", "maroon", "teal", "beige", "lavender")

#: Named style shifts: keyword arguments of :func:`render`.
STYLE_SHIFTS: dict[str, dict[str, Any]] = {
    "base": {},
    "outline": {"outline": True},
    "noise": {"noise_std": 40.0},
    "outline-noise": {"outline": True, "noise_std": 30.0},
}

# Geometry, as fractions of the image side.
_RADIUS = {"small": 0.16, "large": 0.28}
_GRID_RADIUS_MAX = 0.17  # several objects share a 2x2 grid: cap their radius
_POSITION_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
_GRID_CENTRES = np.array([(0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73)], dtype=np.float32)
_JITTER = 0.035
_TINT = 14.0  # +- colour jitter per channel

ATTRIBUTE_NAMES: tuple[str, ...] = ("shape", "colour", "texture", "size", "position", "count", "background")
_VOCAB: dict[str, tuple[Any, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "size": SIZES,
    "position": POSITIONS,
    "count": COUNTS,
    "background": tuple(BACKGROUNDS),
}
#: The base world's allowed values (the defaults of :func:`sample_attributes`).
BASE_WORLD: dict[str, tuple[Any, ...]] = {
    "shape": SHAPES,
    "colour": BASE_COLOURS,
    "texture": BASE_TEXTURES,
    "size": SIZES,
    "position": POSITIONS,
    "count": (1,),
    "background": BASE_BACKGROUNDS,
}


def vocabulary(attribute: str) -> tuple[Any, ...]:
    """All values an attribute can take (names, or ints for ``count``)."""
    if attribute not in _VOCAB:
        raise KeyError(f"unknown attribute {attribute!r} (known: {', '.join(ATTRIBUTE_NAMES)})")
    return _VOCAB[attribute]


# ------------------------------------------------------------------- attributes
@dataclass
class WorldAttributes:
    """Attributes of N images as parallel arrays (indices into the vocabularies).

    The nuisance fields (``jitter``, ``scale``, ``phase``, ``tint``, ``cells``, ``seed``)
    are drawn with the attributes so that :func:`render` is a pure function of them.
    """

    shape: np.ndarray  # (N,) int index into SHAPES
    colour: np.ndarray  # (N,) int index into COLOURS
    texture: np.ndarray  # (N,) int index into TEXTURES
    size: np.ndarray  # (N,) int index into SIZES
    position: np.ndarray  # (N,) int index into POSITIONS (used when count == 1)
    count: np.ndarray  # (N,) int 1..4
    background: np.ndarray  # (N,) int index into BACKGROUNDS
    jitter: np.ndarray  # (N, 4, 2) float32 in [-1, 1]: centre offsets per object
    scale: np.ndarray  # (N,) float32 in [-1, 1]: radius jitter
    phase: np.ndarray  # (N, 2) float32 in [0, 1): texture phase
    tint: np.ndarray  # (N, 3) float32 in [-1, 1]: colour jitter
    cells: np.ndarray  # (N, 4) int: grid cells used by several objects, in order
    seed: np.ndarray  # (N,) int64: per-image seed of pixel noise

    def __len__(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> "WorldAttributes":
        """A subset (slice, index array or boolean mask), always as arrays."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return WorldAttributes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def names(self, attribute: str) -> list[Any]:
        """The attribute of every image as names (ints for ``count``)."""
        values = getattr(self, attribute)
        if attribute == "count":
            return [int(v) for v in values]
        vocab = vocabulary(attribute)
        return [vocab[int(v)] for v in values]

    @staticmethod
    def concat(parts: Sequence["WorldAttributes"]) -> "WorldAttributes":
        return WorldAttributes(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(WorldAttributes)})


def _allowed_indices(attribute: str, spec: Any) -> np.ndarray:
    vocab = vocabulary(attribute)
    values = [spec] if isinstance(spec, (str, int, np.integer)) else list(spec)
    if not values:
        raise ValueError(f"{attribute}: empty list of allowed values")
    out = []
    for v in values:
        if attribute == "count":
            if int(v) not in COUNTS:
                raise ValueError(f"count: {v!r} is not one of {COUNTS}")
            out.append(int(v))
        else:
            if v not in vocab:
                raise ValueError(f"{attribute}: unknown value {v!r} (known: {', '.join(map(str, vocab))})")
            out.append(vocab.index(v))
    return np.asarray(out, dtype=np.int64)


def sample_attributes(n: int, rng: np.random.Generator, **fixed_or_allowed: Any) -> WorldAttributes:
    """Sample the attributes of ``n`` images.

    Each keyword (``shape``, ``colour``, ``texture``, ``size``, ``position``, ``count``,
    ``background``) is either one value (fixed) or a sequence of allowed values (drawn
    uniformly). Unset attributes take the base world's values (:data:`BASE_WORLD`),
    except ``size``: several objects (count > 1) are drawn ``small`` unless sizes are
    given.
    """
    unknown = set(fixed_or_allowed) - set(ATTRIBUTE_NAMES)
    if unknown:
        raise TypeError(f"sample_attributes: unknown attribute(s) {sorted(unknown)} (known: {', '.join(ATTRIBUTE_NAMES)})")
    drawn: dict[str, np.ndarray] = {}
    for name in ATTRIBUTE_NAMES:  # fixed order keeps the stream of random numbers stable
        allowed = _allowed_indices(name, fixed_or_allowed.get(name, BASE_WORLD[name]))
        drawn[name] = allowed[rng.integers(0, len(allowed), size=n)]
    if "size" not in fixed_or_allowed:
        drawn["size"] = np.where(drawn["count"] > 1, SIZES.index("small"), drawn["size"])
    return WorldAttributes(
        **drawn,
        jitter=rng.uniform(-1, 1, size=(n, 4, 2)).astype(np.float32),
        scale=rng.uniform(-1, 1, size=n).astype(np.float32),
        phase=rng.uniform(0, 1, size=(n, 2)).astype(np.float32),
        tint=rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        cells=np.argsort(rng.uniform(size=(n, 4)), axis=1),
        seed=rng.integers(0, 2**31 - 1, size=n, dtype=np.int64),
    )


def sample_labelled(
    rng: np.random.Generator, attribute: str, classes: Sequence[Any], per_class: int, **fixed_or_allowed: Any
) -> tuple[WorldAttributes, np.ndarray]:
    """Attributes of ``per_class`` images per class, the class being the value of
    ``attribute`` (one of ``classes``); labels index ``classes``. Other attributes as in
    :func:`sample_attributes`. Images come in a seeded random order."""
    if attribute in fixed_or_allowed:
        raise TypeError(f"sample_labelled: {attribute!r} is the class attribute and cannot also be fixed")
    labels = np.repeat(np.arange(len(classes)), per_class)
    labels = labels[rng.permutation(len(labels))]
    class_index = _allowed_indices(attribute, list(classes))
    # Sample with the class attribute allowed to take every class value (so that
    # dependent defaults such as the size of several objects see it), then set it.
    attrs = sample_attributes(len(labels), rng, **{attribute: list(classes)}, **fixed_or_allowed)
    setattr(attrs, attribute, class_index[labels])
    if attribute == "count" and "size" not in fixed_or_allowed:
        attrs.size = np.where(attrs.count > 1, SIZES.index("small"), attrs.size)
    return attrs, labels


# --------------------------------------------------------------------- shapes
def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape in object coordinates (u right, v down, radius 1)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.82
    if shape == "triangle":  # apex up
        return (v <= 0.72) & (au <= (v + 1.0) * (1.0 / 1.72))
    if shape == "diamond":
        return au + av <= 1.05
    if shape == "star":  # five spikes, one pointing up
        rho = np.sqrt(u * u + v * v)
        theta = np.arctan2(u, -v) % (2 * np.pi)
        sector = 2 * np.pi / 5
        t = np.abs((theta % sector) - sector / 2) / (sector / 2)  # 1 on a spike, 0 between
        return rho <= 0.42 + 0.6 * t**2
    if shape == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + (v + 0.05) ** 2 > 0.78**2)
    raise KeyError(shape)


def _texture_weight(texture: str, x: np.ndarray, y: np.ndarray, u: np.ndarray, period: float, phase: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Where the secondary colour shows (weight in [0, 1]); x, y in pixels, u local."""
    p0, p1 = phase[:, 0, None, None], phase[:, 1, None, None]
    if texture == "solid":
        return np.zeros_like(u)
    if texture == "striped":  # diagonal stripes
        return (((x + y) / period + p0) % 1.0 < 0.5).astype(np.float32)
    if texture == "dotted":
        fx = (x / period + p0) % 1.0 - 0.5
        fy = (y / period + p1) % 1.0 - 0.5
        return (fx * fx + fy * fy <= 0.28**2).astype(np.float32)
    if texture == "checkered":
        return ((np.floor(x / period + p0) + np.floor(y / period + p1)) % 2).astype(np.float32)
    if texture == "wavy":  # horizontal waves
        return (((y / period + 0.3 * np.sin(np.pi * x / period) + p0) % 1.0) < 0.5).astype(np.float32)
    if texture == "gridded":  # thin grid lines
        return (((x / period + p0) % 1.0 < 0.3) | ((y / period + p1) % 1.0 < 0.3)).astype(np.float32)
    if texture == "gradient":  # left-to-right ramp across the object
        return np.clip((u + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)
    if texture == "speckled":  # deterministic per-pixel hash noise
        h = np.sin(x * 12.9898 + y * 78.233 + (seed[:, None, None] % 997) * 3.7193) * 43758.5453
        return ((h - np.floor(h)) < 0.35).astype(np.float32)
    raise KeyError(texture)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask
    for _ in range(steps):
        padded = np.pad(out, ((0, 0), (1, 1), (1, 1)), constant_values=False)
        out = out & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    return out


def _object_geometry(attrs: WorldAttributes, slot: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre (x, y) and radius in pixels of object ``slot`` of every image."""
    radius = np.array([_RADIUS[s] for s in SIZES], dtype=np.float32)[attrs.size] * (1.0 + 0.1 * attrs.scale)
    single = np.array([_POSITION_CENTRES[p] for p in POSITIONS], dtype=np.float32)[attrs.position]
    grid = _GRID_CENTRES[attrs.cells[:, slot]]
    several = (attrs.count > 1)[:, None]
    centre = np.where(several, grid, single) + _JITTER * attrs.jitter[:, slot]
    radius = np.where(several[:, 0], np.minimum(radius, _GRID_RADIUS_MAX), radius)
    return centre[:, 0] * size, centre[:, 1] * size, radius * size


def render(attrs: WorldAttributes, size: int = 32, outline: bool = False, noise_std: float = 0.0) -> np.ndarray:
    """Render images of the given attributes: uint8 array (N, size, size, 3).

    Args:
        attrs: what to draw (from :func:`sample_attributes`).
        size: image side in pixels.
        outline: draw only each object's contour, in its colour (a style shift).
        noise_std: standard deviation of Gaussian pixel noise (0-255 scale), seeded per
            image by ``attrs.seed`` (a style shift).
    """
    n = len(attrs)
    bg = np.array(list(BACKGROUNDS.values()), dtype=np.float32)[attrs.background]
    img = np.broadcast_to(bg[:, None, None, :], (n, size, size, 3)).copy()
    colour = np.array(list(COLOURS.values()), dtype=np.float32)[attrs.colour] + _TINT * attrs.tint
    colour = np.clip(colour, 0, 255)
    # Secondary (pattern) colour: darker on light backgrounds, lighter on dark ones.
    dark_bg = bg.mean(axis=1, keepdims=True) < 110
    secondary = np.where(dark_bg, 0.45 * colour + 0.55 * 255.0, 0.42 * colour)
    coords = (np.arange(size, dtype=np.float32) + 0.5)[None]
    period = max(3.0, size / 8.0)
    thickness = max(1, int(round(size / 32)))
    for slot in range(max(COUNTS)):
        active = attrs.count > slot
        if not active.any():
            break
        cx, cy, r = _object_geometry(attrs, slot, size)
        for s_idx, shape in enumerate(SHAPES):
            idx = np.flatnonzero(active & (attrs.shape == s_idx))
            if len(idx) == 0:
                continue
            x = np.broadcast_to(coords[:, None, :], (len(idx), size, size))
            y = np.broadcast_to(coords[:, :, None], (len(idx), size, size))
            u = (x - cx[idx, None, None]) / r[idx, None, None]
            v = (y - cy[idx, None, None]) / r[idx, None, None]
            mask = _shape_mask(shape, u, v)
            if outline:
                mask = mask & ~_erode(mask, thickness)
                weight = np.zeros(mask.shape, dtype=np.float32)
            else:
                weight = np.zeros(mask.shape, dtype=np.float32)
                for t_idx, texture in enumerate(TEXTURES):
                    sel = np.flatnonzero(attrs.texture[idx] == t_idx)
                    if len(sel):
                        weight[sel] = _texture_weight(texture, x[sel], y[sel], u[sel], period, attrs.phase[idx[sel]], attrs.seed[idx[sel]])
            w = weight[..., None]
            fill = (1.0 - w) * colour[idx, None, None, :] + w * secondary[idx, None, None, :]
            img[idx] = np.where(mask[..., None], fill, img[idx])
    if noise_std > 0:
        for i in range(n):
            img[i] += np.random.default_rng(int(attrs.seed[i])).normal(0.0, noise_std, size=(size, size, 3)).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------- captions
#: Caption templates: a format string over ``{np}`` (the noun phrase) and
#: ``{background}``, and the attributes the noun phrase names.
CAPTION_TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a photo of {np}.", ("colour", "texture", "shape")),
    ("{np}.", ("colour", "texture", "shape")),
    ("a picture of {np} on a {background} background.", ("colour", "texture", "shape")),
    ("a photo of {np}.", ("size", "colour", "texture", "shape")),
    ("a drawing of {np}.", ("colour", "shape")),
    ("a photo of {np}.", ("shape",)),
    ("a photo of {np}.", ("colour",)),
    ("a photo of {np}.", ("texture",)),
)

#: Zero-shot prompts of the base attributes (classification over one attribute).
ZERO_SHOT_TEMPLATES: dict[str, str] = {
    "shape": "a photo of a {}.",
    "colour": "a photo of a {} object.",
    "texture": "a photo of a {} object.",
}


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def noun_phrase(count: int, adjectives: Sequence[str], shape: str | None) -> str:
    """'a red striped circle', 'three small dotted stars', 'an orange object'."""
    noun = (SHAPE_PLURALS[shape] if count > 1 else shape) if shape else ("objects" if count > 1 else "object")
    words = [*adjectives, noun]
    lead = COUNT_WORDS[count - 1] if count > 1 else _article(words[0])
    return " ".join([lead, *words])


def caption_of(attrs: WorldAttributes, i: int, template: int) -> str:
    """The caption of image ``i`` written with template number ``template``."""
    fmt, named = CAPTION_TEMPLATES[template]
    shape = SHAPES[int(attrs.shape[i])] if "shape" in named else None
    adjectives = []
    if "size" in named:
        adjectives.append(SIZES[int(attrs.size[i])])
    if "colour" in named:
        adjectives.append(tuple(COLOURS)[int(attrs.colour[i])])
    if "texture" in named:
        adjectives.append(TEXTURES[int(attrs.texture[i])])
    phrase = noun_phrase(int(attrs.count[i]), adjectives, shape)
    return fmt.format(np=phrase, background=tuple(BACKGROUNDS)[int(attrs.background[i])])


def caption(attrs: WorldAttributes, rng_or_template: np.random.Generator | int | Sequence[int]) -> list[str]:
    """Captions of every image: a random template per image (a ``Generator``), one
    template for all (an int), or one template index per image (a sequence)."""
    n = len(attrs)
    if isinstance(rng_or_template, np.random.Generator):
        templates = rng_or_template.integers(0, len(CAPTION_TEMPLATES), size=n)
    elif isinstance(rng_or_template, (int, np.integer)):
        templates = np.full(n, int(rng_or_template))
    else:
        templates = np.asarray(rng_or_template, dtype=np.int64)
        if len(templates) != n:
            raise ValueError("one template index per image expected")
    return [caption_of(attrs, i, int(t)) for i, t in enumerate(templates)]


def caption_attributes(attrs: WorldAttributes, templates: Sequence[int]) -> np.ndarray:
    """What each caption asserts: (N, 4) indices of shape, colour, texture, size, -1
    where the caption leaves the attribute open. Two images match a caption when all
    asserted values agree (used for multi-positive contrastive targets)."""
    out = np.full((len(attrs), 4), -1, dtype=np.int64)
    for col, name in enumerate(("shape", "colour", "texture", "size")):
        names = np.array([name in CAPTION_TEMPLATES[int(t)][1] for t in templates])
        out[:, col] = np.where(names, getattr(attrs, name), -1)
    return out


def base_concepts() -> list[str]:
    """Every '{colour} {texture} {shape}' of the base world (256 concepts)."""
    return [f"{c} {t} {s}" for c in BASE_COLOURS for t in BASE_TEXTURES for s in SHAPES]
