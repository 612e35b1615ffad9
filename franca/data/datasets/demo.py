"""The embedded demo dataset: procedurally drawn shapes, written as a real image folder.

Ten classes, one per shape. Everything but the shape is random and independent of the class —
foreground and background colours (smooth fields that change across the image), scale, position,
rotation, stretch, pixel noise and small shape-specific proportions —
so colour says nothing about the class and a useful representation must encode shape while staying
invariant to the rest, which is what DINO-style augmentations teach. Images are drawn at 4x resolution and box-downsampled (anti-aliased edges).

Layout: ``root/train/<class>/<class>_<n>.png`` and ``root/val/<class>/<class>_<n>.png``, read back with
``make_dataset("ImageFolder:root=<root>/train")``. The masks of the drawn shapes go to
``root/segmentation/<split>/masks/<class>/<class>_<n>.png`` (0 = background, 1 + class index = the shape,
where its anti-aliased coverage is at least one half) next to ``root/segmentation/<split>/images``, a link to
``root/<split>``, so ``SegFolder:root=<root>/segmentation/train`` reads images with their masks. ``root/demo_manifest.json`` records the arguments;
calling :func:`write_demo_dataset` again with the same arguments does nothing. CLI::

    python -m franca.data.datasets.demo --root DIR
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_CLASSES = ("arrow", "circle", "crescent", "cross", "hourglass", "lshape", "ring", "square", "star", "triangle")
"""Class names, already in sorted order, so class index == position in this tuple."""

MANIFEST_NAME = "demo_manifest.json"
SEGMENTATION_DIR = "segmentation"
NUM_SEGMENTATION_CLASSES = 11  # background + one per shape
_FORMAT_VERSION = 3
_COLOUR_GRID = 6
_SUPERSAMPLE = 4
_SPLITS = {"train": 0, "val": 1}

# A shape is a list of drawing operations in unit coordinates (radius about 1, centred on 0):
# ("poly", points, fill) or ("disc", (cx, cy), radius, fill); fill 255 paints, 0 cuts a hole.
_Op = tuple


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> list[tuple[float, float]]:
    return [
        (radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _shape_ops(name: str, rng: np.random.Generator) -> list[_Op]:
    """Drawing operations of one instance of class ``name`` with jittered proportions."""
    if name == "circle":
        return [("disc", (0.0, 0.0), 1.0, 255)]
    if name == "ring":
        return [("disc", (0.0, 0.0), 1.0, 255), ("disc", (0.0, 0.0), rng.uniform(0.45, 0.65), 0)]
    if name == "crescent":
        return [("disc", (0.0, 0.0), 1.0, 255), ("disc", (rng.uniform(0.4, 0.6), 0.0), rng.uniform(0.8, 0.95), 0)]
    if name == "square":
        return [("poly", _regular_polygon(4, 1.0, math.pi / 4), 255)]
    if name == "triangle":
        return [("poly", _regular_polygon(3, 1.0, -math.pi / 2), 255)]
    if name == "star":
        outer, inner = (
            _regular_polygon(5, 1.0, -math.pi / 2),
            _regular_polygon(5, rng.uniform(0.35, 0.5), -math.pi / 2 + math.pi / 5),
        )
        return [("poly", [p for pair in zip(outer, inner) for p in pair], 255)]
    if name == "cross":
        w = rng.uniform(0.22, 0.35)
        return [
            ("poly", [(-1, -w), (1, -w), (1, w), (-1, w)], 255),
            ("poly", [(-w, -1), (w, -1), (w, 1), (-w, 1)], 255),
        ]
    if name == "arrow":
        w, head = rng.uniform(0.15, 0.25), rng.uniform(0.0, 0.2)
        return [("poly", [(-1, -w), (head, -w), (head, -0.75), (1, 0), (head, 0.75), (head, w), (-1, w)], 255)]
    if name == "hourglass":
        waist = rng.uniform(0.05, 0.15)
        return [("poly", [(-0.85, -1), (0.85, -1), (waist, 0), (0.85, 1), (-0.85, 1), (-waist, 0)], 255)]
    if name == "lshape":
        w = rng.uniform(0.3, 0.45)
        return [
            (
                "poly",
                [(-0.8, -1), (-0.8 + 2 * w, -1), (-0.8 + 2 * w, 1 - 2 * w), (0.8, 1 - 2 * w), (0.8, 1), (-0.8, 1)],
                255,
            )
        ]
    raise KeyError(name)


def _draw_mask(ops: list[_Op], size: int, rng: np.random.Generator) -> np.ndarray:
    """Rasterise a randomly scaled, rotated, stretched and placed shape; returns alpha in [0, 1], (size, size)."""
    big = size * _SUPERSAMPLE
    half = big / 2
    radius = rng.uniform(0.4, 0.8)
    center = (1 - radius) * rng.uniform(-0.9, 0.9, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    stretch = rng.uniform(0.85, 1.15)
    cos, sin = math.cos(angle), math.sin(angle)

    def to_pixels(x: float, y: float) -> tuple[float, float]:
        x *= stretch
        y /= stretch
        u, v = cos * x - sin * y, sin * x + cos * y
        return half * (1 + center[0] + radius * u), half * (1 + center[1] + radius * v)

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for op in ops:
        if op[0] == "poly":
            draw.polygon([to_pixels(x, y) for x, y in op[1]], fill=op[2])
        else:
            (cx, cy), r, fill = op[1], op[2], op[3]
            px, py = to_pixels(cx, cy)
            pr = half * radius * r
            draw.ellipse([px - pr * stretch, py - pr / stretch, px + pr * stretch, py + pr / stretch], fill=fill)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _colour_field(size: int, bright: bool, rng: np.random.Generator) -> np.ndarray:
    """A smooth (size, size, 3) colour field: random HSV colours on a 6x6 grid, bilinearly interpolated.

    Hue and saturation vary freely; the HSV value stays in the bright (0.6–0.95) or dark (0.08–0.45)
    band so that a bright field always stands out against a dark one. The colour changes every sixth of
    the image, so two crops of one image share little colour — colour is no shortcut across views (with a
    coarser 3x3 grid, or with stripe/checker patterns shared by the whole image, the demo's training learned
    those instead of the shapes: k-NN fell below that of the random-init network).
    """
    low, high = (0.6, 0.95) if bright else (0.08, 0.45)
    cells = _COLOUR_GRID * _COLOUR_GRID
    grid = np.array(
        [colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.15, 1.0), rng.uniform(low, high)) for _ in range(cells)]
    ).reshape(_COLOUR_GRID, _COLOUR_GRID, 3)
    grid_image = Image.fromarray((grid * 255).astype(np.uint8), mode="RGB")
    return np.asarray(grid_image.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def render_demo_sample(class_name: str, image_size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """One random RGB image of class ``class_name`` (one of :data:`DEMO_CLASSES`) and its mask (mode L).

    The shape is bright on a dark background or the reverse (a coin flip); everything else is random.
    Mask: ``1 + class index`` where the shape covers at least half of the pixel, 0 elsewhere.
    """
    alpha = _draw_mask(_shape_ops(class_name, rng), image_size, rng)[..., None]
    mask = np.where(alpha[..., 0] >= 0.5, DEMO_CLASSES.index(class_name) + 1, 0).astype(np.uint8)
    bright_shape = bool(rng.integers(2))
    image = alpha * _colour_field(image_size, bright_shape, rng) + (1 - alpha) * _colour_field(
        image_size, not bright_shape, rng
    )
    image += rng.normal(0, rng.uniform(0.0, 0.04), size=image.shape)
    pixels = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mode="RGB")
    return pixels, Image.fromarray(mask, mode="L")


def render_demo_image(class_name: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """The image of :func:`render_demo_sample` alone."""
    return render_demo_sample(class_name, image_size, rng)[0]


def _manifest(n_train_per_class: int, n_val_per_class: int, image_size: int, seed: int) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "classes": list(DEMO_CLASSES),
        "n_train_per_class": n_train_per_class,
        "n_val_per_class": n_val_per_class,
        "image_size": image_size,
        "seed": seed,
    }


def _read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _complete(root: Path, manifest: dict) -> bool:
    counts = {"train": manifest["n_train_per_class"], "val": manifest["n_val_per_class"]}
    return all(
        len(list(folder.glob("*.png"))) == count
        for split, count in counts.items()
        for name in DEMO_CLASSES
        for folder in (root / split / name, root / SEGMENTATION_DIR / split / "masks" / name)
    )


def write_demo_dataset(
    root: str | Path, n_train_per_class: int = 200, n_val_per_class: int = 50, image_size: int = 64, seed: int = 0
) -> Path:
    """Write the demo image folder under ``root`` (if not already there with these arguments) and return ``root``.

    Image ``n`` of class ``c`` in split ``s`` is drawn from PCG64 seeded with ``(seed, s, c, n)``, so the
    files depend only on the arguments. Generation goes to a temporary folder that is moved into place,
    and the manifest is written last, so an interrupted call is simply redone by the next one.
    """
    if n_train_per_class < 1 or n_val_per_class < 1:
        raise ValueError(f"need at least one image per class and split, got {n_train_per_class} and {n_val_per_class}")
    if image_size < 8:
        raise ValueError(f"demo image_size must be >= 8 pixels, got {image_size}")
    root = Path(root).expanduser()
    wanted = _manifest(n_train_per_class, n_val_per_class, image_size, seed)
    existing = _read_manifest(root)
    if existing == wanted and _complete(root, wanted):
        return root
    if existing is None and any((root / split).exists() for split in _SPLITS):
        raise FileExistsError(
            f"{root} already has train/ or val/ folders not written by the demo generator; use another root"
        )

    staging = root / ".demo_staging"
    shutil.rmtree(staging, ignore_errors=True)
    counts = {"train": n_train_per_class, "val": n_val_per_class}
    for split, split_id in _SPLITS.items():
        (staging / SEGMENTATION_DIR / split).mkdir(parents=True)
        (staging / SEGMENTATION_DIR / split / "images").symlink_to(Path("..", "..", split), target_is_directory=True)
        for class_id, name in enumerate(DEMO_CLASSES):
            folder, masks = staging / split / name, staging / SEGMENTATION_DIR / split / "masks" / name
            folder.mkdir(parents=True)
            masks.mkdir(parents=True)
            for n in range(counts[split]):
                rng = np.random.default_rng([seed, split_id, class_id, n])
                image, mask = render_demo_sample(name, image_size, rng)
                image.save(folder / f"{name}_{n:05d}.png", compress_level=1)
                mask.save(masks / f"{name}_{n:05d}.png", compress_level=1)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    for split in _SPLITS:
        shutil.rmtree(root / split, ignore_errors=True)
        (staging / split).rename(root / split)
    shutil.rmtree(root / SEGMENTATION_DIR, ignore_errors=True)
    (staging / SEGMENTATION_DIR).rename(root / SEGMENTATION_DIR)
    staging.rmdir()
    (root / MANIFEST_NAME).write_text(json.dumps(wanted, indent=2) + "\n")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the procedurally generated demo image folder.")
    parser.add_argument("--root", required=True, help="output folder (gets train/, val/ and demo_manifest.json)")
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_demo_dataset(args.root, args.train_per_class, args.val_per_class, args.image_size, args.seed)
    print(f"demo dataset: {root / 'train'} and {root / 'val'} ({len(DEMO_CLASSES)} classes)")
    print(f"masks: SegFolder:root={root / SEGMENTATION_DIR / 'train'} (and .../val)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
