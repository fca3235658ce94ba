"""Render toy scenes to RGB images, and measure the image statistics that domain words change.

Rendering has two stages. The *texture* stage gives each material its look (asphalt grain, paving tiles, grass
speckle, leaf clumps, window grids come from the scene) and is the same for every domain, since all noise fields
are drawn before the domain is looked at: the same scene and seed rendered at day and at night differ only by
the domain. The *domain* stage then applies one of:

- ``day``: blue sky with soft clouds, the textured scene as it is;
- ``night``: everything dimmed to about a third and tinted blue, a dark sky, lit windows, glowing street lamps
  and tail lights;
- ``snow``: white cover on horizontal surfaces (road with slush patches, sidewalks, grass) and on the tops of
  roofs, tree crowns, cars and lamps, an overcast sky, falling flakes, colours washed out;
- ``fog``: a blend toward grey that thickens with distance, which lowers contrast and saturation.

`image_stats` is the one definition of the statistics (brightness, saturation, contrast, white fraction) that
tests and later measurements of domain words use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..logging import get_logger
from .scenes import BUILDING, CAR, IGNORE_INDEX, TREE, Material, ToyScene, scene_from_labels

logger = get_logger(__name__)

#: The domain words of the toy world, in the order datasets cycle through them.
DOMAINS = ("day", "night", "snow", "fog")

_DAY_SKY = ((0.28, 0.50, 0.86), (0.72, 0.83, 0.95))  # (top, horizon)
_NIGHT_SKY = ((0.01, 0.02, 0.06), (0.08, 0.10, 0.20))
_SNOW_SKY = ((0.70, 0.72, 0.76), (0.84, 0.85, 0.87))
_FOG_GREY = np.array((0.76, 0.77, 0.79), dtype=np.float32)
_SNOW_WHITE = np.array((0.94, 0.95, 0.98), dtype=np.float32)
_WARM_LIGHT = np.array((1.0, 0.84, 0.45), dtype=np.float32)


@dataclass(frozen=True)
class ImageStats:
    """Image statistics that domain words change, averaged over the images given.

    Args:
        brightness (`float`): mean luma (Rec. 601) in [0, 1].
        saturation (`float`): mean HSV saturation in [0, 1].
        contrast (`float`): standard deviation of the luma within an image, in [0, 0.5].
        white_fraction (`float`): share of pixels that are white (luma > 0.8 and saturation < 0.15).
    """

    brightness: float
    saturation: float
    contrast: float
    white_fraction: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def image_stats(images: np.ndarray) -> ImageStats:
    """Measure brightness, saturation, contrast and white fraction of one image or a batch.

    Args:
        images (`np.ndarray`): `(H, W, 3)` or `(B, H, W, 3)` RGB, uint8 in [0, 255] or float in [0, 1].

    Returns:
        `ImageStats`, each field the mean over the batch.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be (H, W, 3) or (B, H, W, 3) RGB, got shape {np.asarray(images).shape}")
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    luma = x @ np.array((0.299, 0.587, 0.114), dtype=np.float32)
    high, low = x.max(axis=-1), x.min(axis=-1)
    saturation = np.where(high > 1e-6, (high - low) / np.maximum(high, 1e-6), 0.0)
    white = (luma > 0.8) & (saturation < 0.15)
    return ImageStats(
        brightness=float(luma.mean()),
        saturation=float(saturation.mean()),
        contrast=float(luma.reshape(len(x), -1).std(axis=1).mean()),
        white_fraction=float(white.mean()),
    )


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth noise with features about `cell` pixels wide: `(H, W)` float32, roughly zero mean, std ~0.6."""
    cell = max(1.0, float(cell))
    grid = rng.standard_normal((int(np.ceil(height / cell)) + 2, int(np.ceil(width / cell)) + 2)).astype(np.float32)
    y = (np.arange(height, dtype=np.float32) + 0.5) / cell
    x = (np.arange(width, dtype=np.float32) + 0.5) / cell
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    ty, tx = y - y0, x - x0
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)  # smoothstep
    top = grid[y0][:, x0] * (1 - tx) + grid[y0][:, x0 + 1] * tx
    bottom = grid[y0 + 1][:, x0] * (1 - tx) + grid[y0 + 1][:, x0 + 1] * tx
    return top * (1 - ty)[:, None] + bottom * ty[:, None]


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of an `(H, W)` float array with edge padding."""
    if radius < 1:
        return image
    out = image
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float64)
        n = out.shape[axis]
        hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        out = ((hi - lo) / (2 * radius + 1)).astype(np.float32)
    return out


def _sky(scene: ToyScene, colors) -> np.ndarray:
    """A vertical sky gradient from `colors[0]` at the top to `colors[1]` at the horizon: `(H, 1, 3)` float32."""
    h = scene.labels.shape[0]
    t = np.clip(np.arange(h, dtype=np.float32) / max(1, scene.horizon), 0.0, 1.0)[:, None, None]
    top, horizon = (np.asarray(c, dtype=np.float32) for c in colors)
    return top * (1 - t) + horizon * t


def _top_caps(labels: np.ndarray, class_id: int, thickness: int) -> np.ndarray:
    """Pixels of `class_id` with another class within `thickness` rows above them: the upward-facing tops."""
    mask = labels == class_id
    exposed = np.zeros_like(mask)
    for k in range(1, thickness + 1):
        above = np.zeros_like(mask)
        above[k:] = mask[:-k]
        exposed |= ~above
    return mask & exposed


def render_scene(
    scene: ToyScene | np.ndarray, domain: str = "day", rng: np.random.Generator | None = None
) -> np.ndarray:
    """Render a toy scene (or a bare toy label map) as an RGB image in one domain.

    Args:
        scene (`ToyScene` or `np.ndarray`): a scene from `make_scene`, or an `(H, W)` int label map of toy ids
            (rendered with one plain material per class).
        domain (`str`, optional, defaults to "day"): one of `DOMAINS`.
        rng (`np.random.Generator`, optional): source of the texture noise; defaults to a generator seeded 0.
            The noise drawn does not depend on `domain`, so one scene rendered with equal generators in two
            domains differs only by the domain.

    Returns:
        `np.ndarray` `(H, W, 3)` uint8 RGB.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    if not isinstance(scene, ToyScene):
        scene = scene_from_labels(scene)
    rng = np.random.default_rng(0) if rng is None else rng
    h, w = scene.labels.shape
    size = min(h, w)
    mat = scene.materials

    # 1. every noise field, drawn in a fixed order whatever the domain
    grain = rng.standard_normal((h, w)).astype(np.float32)
    leaves = _value_noise(rng, h, w, max(1.5, size / 22))
    patches = _value_noise(rng, h, w, max(2.0, size / 8))
    clouds = _value_noise(rng, h, w, max(3.0, size / 5))
    flakes = rng.random((h, w)).astype(np.float32)
    pixel_noise = rng.standard_normal((h, w, 3)).astype(np.float32)

    # 2. textures
    mod = 1.0 + 0.03 * grain
    is_ = {m: mat == m for m in Material}
    mod[is_[Material.GRASS]] = (1.0 + 0.16 * grain + 0.08 * patches)[is_[Material.GRASS]]
    mod[is_[Material.CANOPY]] = (1.0 + 0.32 * leaves + 0.06 * grain)[is_[Material.CANOPY]]
    mod[is_[Material.ROAD]] = (1.0 + 0.04 * grain + 0.05 * patches)[is_[Material.ROAD]]
    mod[is_[Material.WALL]] = (1.0 + 0.02 * grain + 0.04 * patches)[is_[Material.WALL]]
    tile = max(3, int(round(size / 14)))
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    joints = (rows % tile == 0) | (cols % tile == 0)
    mod[is_[Material.SIDEWALK] & joints] *= 0.78
    img = scene.albedo * np.clip(mod, 0.3, 1.7)[..., None]
    sky = is_[Material.SKY]

    # 3. the domain
    if domain == "day":
        cover = np.clip(0.9 * clouds - 0.25, 0.0, 0.6)[..., None]
        day_sky = _sky(scene, _DAY_SKY) * (1 - cover) + 0.97 * cover
        img = np.where(sky[..., None], day_sky, img)
    elif domain == "night":
        img = img * 0.3 * np.array((0.78, 0.86, 1.15), dtype=np.float32)
        stars = (flakes > 0.997) * 0.7
        night_sky = _sky(scene, _NIGHT_SKY) + stars[..., None]
        img = np.where(sky[..., None], night_sky, img)
        lit = is_[Material.WINDOW_LIT]
        img[lit] = _WARM_LIGHT * (0.9 + 0.1 * grain[lit, None])
        img[is_[Material.TAILLIGHT]] = (1.0, 0.18, 0.12)
        lamps = is_[Material.LAMP]
        if lamps.any():
            glow = _box_blur(_box_blur(lamps.astype(np.float32), max(1, size // 16)), max(1, size // 16))
            glow = np.clip(glow * (size / 5.0), 0.0, 0.8)[..., None]
            img = img + glow * _WARM_LIGHT * 0.6
            img[lamps] = (1.0, 0.97, 0.8)
    elif domain == "snow":
        labels = scene.labels
        cover = np.zeros((h, w), dtype=np.float32)
        road = is_[Material.ROAD] | is_[Material.LANE]
        cover[road] = np.clip(0.62 + 0.45 * patches, 0.25, 0.92)[road]  # slush patches show the asphalt
        cover[is_[Material.SIDEWALK]] = 0.72
        grass = is_[Material.GRASS]
        cover[grass] = np.clip(0.78 + 0.25 * grain * 0.5, 0.55, 0.95)[grass]
        canopy = is_[Material.CANOPY]
        cover[canopy] = np.clip(0.8 * leaves - 0.1, 0.0, 0.6)[canopy]  # snow lying on leaf clumps
        caps = (
            _top_caps(labels, BUILDING, max(1, round(0.02 * h)))
            | _top_caps(labels, TREE, max(1, round(0.035 * h)))
            | _top_caps(labels, CAR, max(1, round(0.025 * h)))
            | _top_caps(labels, IGNORE_INDEX, max(1, round(0.01 * h)))
        )
        cover[caps] = 0.92
        img = img * (1 - cover[..., None]) + _SNOW_WHITE * cover[..., None]
        img = np.where(sky[..., None], _sky(scene, _SNOW_SKY), img)
        grey = img.mean(axis=-1, keepdims=True)
        img = 0.6 * img + 0.4 * grey + 0.06
        falling = flakes > 0.993
        img[falling] = 0.5 * img[falling] + 0.5
    elif domain == "fog":
        thick = (0.25 + 0.5 * scene.depth**1.3)[..., None]
        img = np.where(sky[..., None], _FOG_GREY, img * (1 - thick) + _FOG_GREY * thick)
    else:  # pragma: no cover - checked above
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")

    # 4. sensor noise
    img = img + 0.012 * pixel_noise
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
