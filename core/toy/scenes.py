"""Procedural street scenes: the label maps of the toy world.

A scene is painted back to front on a small canvas: sky, a row of buildings standing on the horizon, the ground
(a road in perspective that narrows to a vanishing point, sidewalk strips beside it, grass or paving beyond),
then trees, lamp posts, people and cars sorted by depth so nearer objects cover farther ones. Besides the class
ids, the painter records what the renderer needs to texture the scene: a *material* per pixel (window, roof,
wheel, shirt, ...), a base colour per pixel (one colour per building, car, shirt) and a depth per pixel (fog
thickens with distance).

Every size is a fraction of the image height or width, so the same seed gives the same layout (up to pixel
rounding) at 128x128 and at 32x32.

Street furniture (lamp posts and their lamps) is painted with the ignore index: it is visible in the image but
belongs to no class, as unlabelled clutter does in real datasets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from ..logging import get_logger

logger = get_logger(__name__)

#: Class names of the toy world in id order; must equal the names of the built-in ``toy`` label set.
TOY_CLASSES = ("sky", "road", "sidewalk", "grass", "building", "tree", "car", "person")
SKY, ROAD, SIDEWALK, GRASS, BUILDING, TREE, CAR, PERSON = range(len(TOY_CLASSES))
IGNORE_INDEX = 255


class Material(IntEnum):
    """What a pixel is made of; the renderer textures and lights each material in its own way."""

    SKY = 0
    ROAD = 1
    LANE = 2
    SIDEWALK = 3
    GRASS = 4
    WALL = 5
    ROOF = 6
    WINDOW = 7
    WINDOW_LIT = 8
    CANOPY = 9
    TRUNK = 10
    CAR_BODY = 11
    CAR_GLASS = 12
    WHEEL = 13
    TAILLIGHT = 14
    SKIN = 15
    SHIRT = 16
    TROUSERS = 17
    POLE = 18
    LAMP = 19


#: The material a pixel of each class gets when a scene is rebuilt from a bare label map.
DEFAULT_MATERIAL = {
    SKY: Material.SKY,
    ROAD: Material.ROAD,
    SIDEWALK: Material.SIDEWALK,
    GRASS: Material.GRASS,
    BUILDING: Material.WALL,
    TREE: Material.CANOPY,
    CAR: Material.CAR_BODY,
    PERSON: Material.SHIRT,
    IGNORE_INDEX: Material.POLE,
}

#: Base colours (RGB in [0, 1]) of the materials whose colour does not vary per object.
MATERIAL_COLOR = {
    Material.SKY: (0.45, 0.65, 0.88),
    Material.ROAD: (0.36, 0.36, 0.37),
    Material.LANE: (0.93, 0.91, 0.80),
    Material.SIDEWALK: (0.70, 0.67, 0.62),
    Material.GRASS: (0.42, 0.68, 0.22),
    Material.WALL: (0.62, 0.40, 0.32),
    Material.ROOF: (0.40, 0.28, 0.24),
    Material.WINDOW: (0.22, 0.28, 0.38),
    Material.WINDOW_LIT: (0.22, 0.28, 0.38),
    Material.CANOPY: (0.14, 0.36, 0.13),
    Material.TRUNK: (0.36, 0.24, 0.14),
    Material.CAR_BODY: (0.15, 0.30, 0.80),
    Material.CAR_GLASS: (0.12, 0.16, 0.22),
    Material.WHEEL: (0.06, 0.06, 0.06),
    Material.TAILLIGHT: (0.75, 0.08, 0.08),
    Material.SKIN: (0.85, 0.66, 0.52),
    Material.SHIRT: (0.80, 0.20, 0.45),
    Material.TROUSERS: (0.14, 0.15, 0.30),
    Material.POLE: (0.28, 0.29, 0.31),
    Material.LAMP: (0.80, 0.80, 0.74),
}

_BUILDING_COLORS = np.array(
    [
        (0.66, 0.36, 0.28),  # brick
        (0.78, 0.66, 0.47),  # sandstone
        (0.47, 0.50, 0.58),  # blue-grey concrete
        (0.52, 0.38, 0.28),  # brown
        (0.84, 0.78, 0.66),  # cream
        (0.60, 0.46, 0.54),  # mauve plaster
    ]
)
_CAR_COLORS = np.array(
    [
        (0.80, 0.10, 0.10),  # red
        (0.12, 0.28, 0.82),  # blue
        (0.95, 0.78, 0.10),  # yellow
        (0.95, 0.48, 0.08),  # orange
        (0.05, 0.62, 0.62),  # teal
        (0.92, 0.92, 0.94),  # white
    ]
)
_SHIRT_COLORS = np.array(
    [
        (0.85, 0.15, 0.45),  # magenta
        (0.95, 0.55, 0.10),  # orange
        (0.55, 0.20, 0.75),  # purple
        (0.10, 0.70, 0.85),  # cyan
        (0.90, 0.85, 0.15),  # yellow
    ]
)


@dataclass
class ToyScene:
    """One procedural street scene.

    Args:
        labels (`np.ndarray`): `(H, W)` int64 class ids of `TOY_CLASSES`, with `IGNORE_INDEX` (255) on street
            furniture.
        materials (`np.ndarray`): `(H, W)` uint8 `Material` values.
        albedo (`np.ndarray`): `(H, W, 3)` float32 base colour in [0, 1].
        depth (`np.ndarray`): `(H, W)` float32 in [0, 1]; 0 is the bottom edge of the image, 1 the horizon/sky.
        instances (`np.ndarray`): `(H, W)` int32 object instance ids, 0 where no object (sky, ground).
        horizon (`int`): the horizon row.
        objects (`dict[str, int]`): how many instances of each kind ("building", "tree", "car", "person", "pole")
            are visible (at least a few pixels left after occlusion).
    """

    labels: np.ndarray
    materials: np.ndarray
    albedo: np.ndarray
    depth: np.ndarray
    instances: np.ndarray
    horizon: int
    objects: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """`(H, W)` of the scene."""
        h, w = self.labels.shape
        return h, w


def normalize_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """Return `(H, W)` from an int (square) or a pair, checking that both are at least 16 pixels.

    Args:
        size (`int` or `tuple[int, int]`): the image size.
    """
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        try:
            height, width = (int(v) for v in size)
        except (TypeError, ValueError) as err:
            raise ValueError(f"size must be an int or a (height, width) pair, got {size!r}") from err
    if height < 16 or width < 16:
        raise ValueError(f"size must be at least 16x16 pixels for a toy scene, got {height}x{width}")
    return height, width


def sample_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random generator of one stream of sample `index` of a dataset with seed `seed`.

    Each sample draws from its own seed sequence `[seed, index, stream]`, so sample `i` is reproducible alone and
    the scene, the rendering noise and the caption do not shift one another. Streams: 0 scene, 1 render,
    2 caption.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index), int(stream)])


class _Canvas:
    """Paints shapes into the label, material, colour, depth and instance maps of a scene."""

    def __init__(self, height: int, width: int):
        self.h, self.w = height, width
        self.labels = np.full((height, width), SKY, dtype=np.int64)
        self.materials = np.full((height, width), Material.SKY, dtype=np.uint8)
        self.albedo = np.empty((height, width, 3), dtype=np.float32)
        self.albedo[:] = MATERIAL_COLOR[Material.SKY]
        self.depth = np.ones((height, width), dtype=np.float32)
        self.instances = np.zeros((height, width), dtype=np.int32)
        self.kinds: dict[int, str] = {}

    def window(self, y0: float, y1: float, x0: float, x1: float):
        """Slices and pixel-centre coordinates of the box `[y0, y1) x [x0, x1)` clipped to the canvas."""
        r0, r1 = max(0, int(np.floor(y0))), min(self.h, int(np.ceil(y1)))
        c0, c1 = max(0, int(np.floor(x0))), min(self.w, int(np.ceil(x1)))
        if r1 <= r0 or c1 <= c0:
            return None
        ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5
        return (slice(r0, r1), slice(c0, c1)), ys, xs

    def paint(self, region, mask, label, material, color=None, depth=None, instance=0):
        """Paint `mask` (bool, the shape of `region`) with a class, a material, a colour, a depth, an instance."""
        self.labels[region][mask] = label
        self.materials[region][mask] = material
        self.albedo[region][mask] = MATERIAL_COLOR[material] if color is None else color
        if depth is not None:
            self.depth[region][mask] = depth
        self.instances[region][mask] = instance

    def rect(self, y0, y1, x0, x1, label, material, color=None, depth=None, instance=0) -> None:
        """Paint the box `[y0, y1) x [x0, x1)` (clipped to the canvas) in one go."""
        win = self.window(y0, y1, x0, x1)
        if win is not None:
            region, ys, xs = win
            self.paint(region, np.ones((ys.shape[0], xs.shape[1]), bool), label, material, color, depth, instance)

    def new_instance(self, kind: str) -> int:
        instance = len(self.kinds) + 1
        self.kinds[instance] = kind
        return instance


def _jitter(rng: np.random.Generator, color, amount: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(color, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0)


@dataclass
class _Ground:
    """Perspective geometry of the ground: the road and sidewalks as functions of the row."""

    horizon: float
    height: int
    width: int
    vanish_x: float
    bottom_x: float
    road_half: float
    walk: float

    def s(self, y):
        """Nearness in [0, 1] of row `y`: 0 at the horizon, 1 at the bottom edge."""
        return np.clip((y - self.horizon) / (self.height - self.horizon), 0.0, 1.0)

    def center(self, y):
        return self.vanish_x + (self.bottom_x - self.vanish_x) * self.s(y)

    def half(self, y):
        return self.width * (0.01 + self.road_half * self.s(y))

    def walk_width(self, y):
        return self.width * (0.004 + self.walk * self.s(y))


def _paint_buildings(canvas: _Canvas, rng: np.random.Generator, horizon: int) -> None:
    h, w = canvas.h, canvas.w
    size = min(h, w)
    x = -rng.uniform(0.0, 0.1) * w
    while x < w:
        bw = rng.uniform(0.10, 0.26) * w
        if rng.random() < 0.18:  # a gap shows the sky between two buildings
            x += rng.uniform(0.03, 0.08) * w
        top = rng.uniform(0.06, max(0.07, horizon / h - 0.12)) * h
        x0, x1 = x, x + bw
        x = x1
        # every random draw comes before any branch on pixels, so layouts agree across sizes
        wall = _jitter(rng, _BUILDING_COLORS[rng.integers(len(_BUILDING_COLORS))])
        win_w = max(1.0, rng.uniform(0.022, 0.04) * size)
        win_h = win_w * rng.uniform(1.0, 1.6)
        pitch_x = win_w * rng.uniform(1.8, 2.6)
        pitch_y = win_h * rng.uniform(1.6, 2.2)
        lit_cells = rng.random(256) < rng.uniform(0.2, 0.6)
        win = canvas.window(top, horizon, x0, x1)
        if win is None:
            continue
        region, ys, xs = win
        instance = canvas.new_instance("building")
        full = np.ones((ys.shape[0], xs.shape[1]), dtype=bool)
        canvas.paint(region, full, BUILDING, Material.WALL, wall, 0.9, instance)
        # a darker cornice on the flat roof
        cornice = max(1.0, 0.015 * size)
        roof = np.broadcast_to(ys < top + cornice, full.shape)
        canvas.paint(region, roof, BUILDING, Material.ROOF, wall * 0.6, 0.9, instance)
        # a grid of windows; some are lit (they glow at night)
        margin = max(1.0, 0.5 * win_w)
        fx = (xs - (x0 + margin)) % pitch_x
        fy = (ys - (top + cornice + margin)) % pitch_y
        inside = (xs > x0 + margin) & (xs < x1 - margin) & (ys > top + cornice + margin) & (ys < horizon - 2 * margin)
        glass = inside & (fx < win_w) & (fy < win_h)
        canvas.paint(region, glass, BUILDING, Material.WINDOW, None, 0.9, instance)
        cells = (np.floor((xs - x0) / pitch_x) * 7919 + np.floor((ys - top) / pitch_y) * 104729).astype(np.int64)
        lit = glass & lit_cells[cells % 256]
        canvas.paint(region, lit, BUILDING, Material.WINDOW_LIT, None, 0.9, instance)


def _paint_ground(canvas: _Canvas, rng: np.random.Generator, ground: _Ground) -> None:
    h, w = canvas.h, canvas.w
    top = int(np.floor(ground.horizon))
    win = canvas.window(top, h, 0, w)
    if win is None:
        return
    region, ys, xs = win
    s = ground.s(ys)
    depth = np.broadcast_to(1.0 - s, (ys.shape[0], xs.shape[1]))
    below = np.broadcast_to(ys >= ground.horizon, depth.shape)
    center, half, walk = ground.center(ys), ground.half(ys), ground.walk_width(ys)
    left_side = xs < center
    # beyond the sidewalks: grass on most sides, sometimes a paved square
    for side_mask, kind in ((left_side, rng.random()), (~left_side, rng.random())):
        mask = below & side_mask
        if kind < 0.75:
            canvas.paint(region, mask, GRASS, Material.GRASS, _jitter(rng, MATERIAL_COLOR[Material.GRASS], 0.04))
        else:
            canvas.paint(region, mask, SIDEWALK, Material.SIDEWALK)
    off = np.abs(xs - center)
    canvas.paint(region, below & (off < half + walk), SIDEWALK, Material.SIDEWALK)
    canvas.paint(region, below & (off < half), ROAD, Material.ROAD)
    # a dashed centre line, dashes shortening toward the horizon
    dist = 1.0 / (s + 0.08)
    dash = ((dist * rng.uniform(1.2, 1.8)) % 1.0) < 0.5
    line = below & (off < np.maximum(0.5, 0.006 * w * s)) & dash & (s > 0.08)
    canvas.paint(region, line, ROAD, Material.LANE)
    canvas.depth[region][below] = depth[below]


def _grass_patches(canvas: _Canvas, rng: np.random.Generator, ground: _Ground) -> None:
    """A few rounded grass beds on paved areas (a square beside the road) to vary the ground."""
    h, w = canvas.h, canvas.w
    for _ in range(rng.integers(0, 3)):
        y = ground.horizon + rng.uniform(0.3, 0.95) * (h - ground.horizon)
        s = float(ground.s(y))
        side = rng.choice([-1.0, 1.0])
        cx = float(ground.center(y)) + side * (
            float(ground.half(y) + ground.walk_width(y)) + rng.uniform(0.05, 0.3) * w
        )
        ry, rx = (0.02 + 0.05 * s) * h, (0.05 + 0.12 * s) * w
        win = canvas.window(y - ry, y + ry, cx - rx, cx + rx)
        if win is None:
            continue
        region, ys, xs = win
        inside = ((ys - y) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1.0
        paved = canvas.labels[region] == SIDEWALK
        off = np.abs(xs - ground.center(ys))
        beyond = off > ground.half(ys) + ground.walk_width(ys)
        canvas.paint(region, inside & paved & beyond, GRASS, Material.GRASS)


def _paint_tree(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, s: float) -> None:
    h = canvas.h
    height = h * (0.14 + 0.5 * s) * rng.uniform(0.8, 1.2)
    rx, ry = height * rng.uniform(0.22, 0.32), height * rng.uniform(0.26, 0.34)
    cy = y - height + ry
    instance = canvas.new_instance("tree")
    depth = 1.0 - s
    trunk_w = max(1.0, 0.07 * height)
    canvas.rect(cy, y, x - trunk_w / 2, x + trunk_w / 2, TREE, Material.TRUNK, None, depth, instance)
    leaves = _jitter(rng, MATERIAL_COLOR[Material.CANOPY], 0.04)
    blobs = [(x, cy, rx, ry)]
    for _ in range(rng.integers(1, 4)):  # smaller clumps around the crown make it irregular
        bx, by = x + rng.uniform(-0.6, 0.6) * rx, cy + rng.uniform(-0.5, 0.3) * ry
        blobs.append((bx, by, rx * rng.uniform(0.5, 0.75), ry * rng.uniform(0.5, 0.75)))
    for bx, by, brx, bry in blobs:
        win = canvas.window(by - bry, by + bry, bx - brx, bx + brx)
        if win is None:
            continue
        region, ys, xs = win
        inside = ((ys - by) / bry) ** 2 + ((xs - bx) / brx) ** 2 < 1.0
        canvas.paint(region, inside, TREE, Material.CANOPY, leaves, depth, instance)


def _paint_person(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, s: float) -> None:
    h = canvas.h
    height = h * (0.07 + 0.26 * s) * rng.uniform(0.85, 1.1)
    width = height * 0.3
    instance = canvas.new_instance("person")
    depth = 1.0 - s
    shirt = _jitter(rng, _SHIRT_COLORS[rng.integers(len(_SHIRT_COLORS))], 0.05)
    trousers = _jitter(rng, MATERIAL_COLOR[Material.TROUSERS], 0.05)
    skin = _jitter(rng, MATERIAL_COLOR[Material.SKIN], 0.1)
    top = y - height
    parts = [
        # (y0, y1, half width, material, colour)
        (top + 0.17 * height, top + 0.58 * height, width / 2, Material.SHIRT, shirt),
        (top + 0.55 * height, y, width * 0.36, Material.TROUSERS, trousers),
    ]
    for y0, y1, half, material, color in parts:
        canvas.rect(y0, y1, x - half, x + half, PERSON, material, color, depth, instance)
    r = max(0.6, 0.1 * height)
    hy = top + r
    win = canvas.window(hy - r, hy + r, x - r, x + r)
    if win is not None:
        region, ys, xs = win
        inside = (ys - hy) ** 2 + (xs - x) ** 2 < r * r
        canvas.paint(region, inside, PERSON, Material.SKIN, skin, depth, instance)


def _paint_pole(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, s: float, toward: float) -> None:
    h, w = canvas.h, canvas.w
    height = h * (0.16 + 0.42 * s) * rng.uniform(0.9, 1.1)
    width = max(1.0, 0.012 * w * (0.4 + s))
    instance = canvas.new_instance("pole")
    depth = 1.0 - s
    canvas.rect(y - height, y, x - width / 2, x + width / 2, IGNORE_INDEX, Material.POLE, None, depth, instance)
    # the lamp hangs over the road side
    arm = max(2.0, 0.12 * height)
    lx0, lx1 = (x, x + toward * arm) if toward > 0 else (x + toward * arm, x)
    lamp_h = max(1.0, 0.35 * width + 0.5)
    canvas.rect(y - height, y - height + lamp_h, lx0, lx1, IGNORE_INDEX, Material.LAMP, None, depth, instance)


def _paint_car(canvas: _Canvas, rng: np.random.Generator, x: float, y: float, s: float, road_width: float) -> None:
    width = road_width * rng.uniform(0.30, 0.40)
    height = width * rng.uniform(0.62, 0.75)
    instance = canvas.new_instance("car")
    depth = 1.0 - s
    body = _jitter(rng, _CAR_COLORS[rng.integers(len(_CAR_COLORS))], 0.04)
    top = y - height
    # the cabin: a trapezoid narrower at the top, with a rear window
    win = canvas.window(top, top + 0.45 * height, x - 0.4 * width, x + 0.4 * width)
    if win is not None:
        region, ys, xs = win
        t = (ys - top) / (0.45 * height)
        half = width * (0.3 + 0.1 * t)
        cabin = np.abs(xs - x) < half
        canvas.paint(region, cabin, CAR, Material.CAR_BODY, body, depth, instance)
        glass = (np.abs(xs - x) < half - max(0.6, 0.06 * width)) & (t > 0.18) & (t < 0.9)
        canvas.paint(region, glass, CAR, Material.CAR_GLASS, None, depth, instance)
    # the body with tail lights at both ends
    win = canvas.window(top + 0.45 * height, y - 0.12 * height, x - width / 2, x + width / 2)
    if win is not None:
        region, ys, xs = win
        canvas.paint(region, np.ones((ys.shape[0], xs.shape[1]), bool), CAR, Material.CAR_BODY, body, depth, instance)
        yl = top + 0.55 * height
        lights = (np.abs(np.abs(xs - x) - 0.4 * width) < 0.07 * width) & (ys > yl) & (ys < yl + 0.12 * height + 0.5)
        canvas.paint(region, lights, CAR, Material.TAILLIGHT, None, depth, instance)
    # wheels under the body
    for wx in (x - 0.34 * width, x + 0.34 * width):
        canvas.rect(
            y - 0.14 * height, y, wx - 0.11 * width, wx + 0.11 * width, CAR, Material.WHEEL, None, depth, instance
        )


def make_scene(size: int | tuple[int, int] = 128, seed: int = 0, index: int = 0) -> ToyScene:
    """Paint sample `index` of the toy world with seed `seed`.

    Args:
        size (`int` or `tuple[int, int]`, optional, defaults to 128): image size, square or `(H, W)`; at least 16.
        seed (`int`, optional, defaults to 0): dataset seed (non-negative).
        index (`int`, optional, defaults to 0): sample index (non-negative); `(seed, index)` alone fixes the scene.

    Returns:
        `ToyScene` whose `labels` is `(H, W)` int64 with ids in `[0, 8)` or 255.
    """
    h, w = normalize_size(size)
    rng = sample_rng(seed, index, 0)
    canvas = _Canvas(h, w)
    horizon = int(round(h * rng.uniform(0.42, 0.58)))
    ground = _Ground(
        horizon=float(horizon),
        height=h,
        width=w,
        vanish_x=w * rng.uniform(0.3, 0.7),
        bottom_x=w * rng.uniform(0.4, 0.6),
        road_half=rng.uniform(0.26, 0.38),
        walk=rng.uniform(0.07, 0.13),
    )
    _paint_buildings(canvas, rng, horizon)
    _paint_ground(canvas, rng, ground)
    _grass_patches(canvas, rng, ground)

    # objects standing on the ground, painted far to near
    span = h - horizon
    placed: list[tuple[float, int, tuple]] = []
    for _ in range(rng.choice(5, p=[0.08, 0.22, 0.3, 0.25, 0.15])):  # trees beyond the sidewalks
        s = rng.uniform(0.08, 1.0)
        y = horizon + s * span
        side = rng.choice([-1.0, 1.0])
        edge = float(ground.half(y) + ground.walk_width(y))
        x = float(ground.center(y)) + side * (edge + rng.uniform(0.01, 0.12) * w)
        placed.append((y, 0, ("tree", x, y, s)))
    for _ in range(rng.choice(4, p=[0.2, 0.35, 0.3, 0.15])):  # people on the sidewalks
        s = rng.uniform(0.15, 1.0)
        y = horizon + s * span
        side = rng.choice([-1.0, 1.0])
        half, walk = float(ground.half(y)), float(ground.walk_width(y))
        x = float(ground.center(y)) + side * (half + rng.uniform(0.25, 0.75) * walk)
        placed.append((y, 1, ("person", x, y, s)))
    for _ in range(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15])):  # lamp posts at the kerb
        s = rng.uniform(0.1, 0.9)
        y = horizon + s * span
        side = rng.choice([-1.0, 1.0])
        x = float(ground.center(y)) + side * (float(ground.half(y)) + 0.15 * float(ground.walk_width(y)))
        placed.append((y, 2, ("pole", x, y, s, -side)))
    cars: list[tuple[float, float, float]] = []
    for _ in range(rng.choice(5, p=[0.06, 0.3, 0.3, 0.22, 0.12])):  # cars in either lane, not stacked
        for _attempt in range(4):
            s = rng.uniform(0.12, 1.0)
            y = horizon + s * span
            half = float(ground.half(y))
            x = float(ground.center(y)) + rng.choice([-1.0, 1.0]) * half * rng.uniform(0.35, 0.55)
            # in units of road width: another car close in both depth and lateral position would hide this one
            if all(abs(s - s2) > 0.18 * s or abs(x - x2) > 0.8 * max(w2, half) for s2, x2, w2 in cars):
                cars.append((s, x, half))
                placed.append((y, 3, ("car", x, y, s, 2 * half)))
                break
    placed.sort(key=lambda item: (item[0], item[1]))
    for _, _, spec in placed:
        kind, *args = spec
        if kind == "tree":
            _paint_tree(canvas, rng, *args)
        elif kind == "person":
            _paint_person(canvas, rng, *args)
        elif kind == "pole":
            _paint_pole(canvas, rng, *args)
        elif kind == "car":
            _paint_car(canvas, rng, *args)
        else:  # pragma: no cover - the kinds above are the only ones placed
            raise ValueError(f"unknown object kind {kind!r}")

    # count instances that stay visible after occlusion (a few pixels at least)
    min_pixels = max(2, (h * w) // 2000)
    ids, counts = np.unique(canvas.instances, return_counts=True)
    objects = {"building": 0, "tree": 0, "car": 0, "person": 0, "pole": 0}
    for instance, count in zip(ids.tolist(), counts.tolist()):
        if instance and count >= min_pixels:
            objects[canvas.kinds[instance]] += 1
    return ToyScene(
        labels=canvas.labels,
        materials=canvas.materials,
        albedo=canvas.albedo,
        depth=canvas.depth,
        instances=canvas.instances,
        horizon=horizon,
        objects=objects,
    )


def make_label_map(size: int | tuple[int, int] = 128, seed: int = 0, index: int = 0) -> np.ndarray:
    """The label map of `make_scene(size, seed, index)`: `(H, W)` int64 class ids, 255 on unlabelled clutter."""
    return make_scene(size, seed, index).labels


def scene_from_labels(labels: np.ndarray) -> ToyScene:
    """Rebuild a plain scene (default materials and colours) from a bare toy label map, e.g. one drawn by hand.

    Args:
        labels (`np.ndarray`): `(H, W)` integer class ids of `TOY_CLASSES`, or 255.

    Returns:
        `ToyScene` with one material and colour per class, and depth from the row (the horizon at the lowest sky
        row, or mid-height when there is no sky).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an (H, W) integer array, got shape {labels.shape} dtype {labels.dtype}")
    bad = ~np.isin(labels, list(DEFAULT_MATERIAL))
    if bad.any():
        y, x = np.argwhere(bad)[0]
        raise ValueError(
            f"labels has id {int(labels[y, x])} at pixel (y={y}, x={x}); toy ids are 0..{len(TOY_CLASSES) - 1} "
            f"or {IGNORE_INDEX}"
        )
    h, w = labels.shape
    materials = np.zeros((h, w), dtype=np.uint8)
    albedo = np.zeros((h, w, 3), dtype=np.float32)
    for class_id, material in DEFAULT_MATERIAL.items():
        mask = labels == class_id
        materials[mask] = material
        albedo[mask] = MATERIAL_COLOR[material]
    sky_rows = np.nonzero((labels == SKY).any(axis=1))[0]
    horizon = int(sky_rows.max()) + 1 if sky_rows.size else h // 2
    rows = np.arange(h, dtype=np.float32)[:, None]
    depth = np.broadcast_to(1.0 - np.clip((rows - horizon) / max(1, h - horizon), 0.0, 1.0), (h, w))
    depth = np.where(labels == SKY, 1.0, depth).astype(np.float32)
    return ToyScene(
        labels=labels.astype(np.int64),
        materials=materials,
        albedo=albedo,
        depth=depth,
        instances=np.zeros((h, w), dtype=np.int32),
        horizon=horizon,
        objects={},
    )
