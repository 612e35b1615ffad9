"""Patch features as pictures: the first three principal components of an image's patch tokens as RGB.

For one image the normalised patch tokens ``X`` (h·w, D) are centred and projected on their first
three principal directions (SVD of ``X - mean``; each direction's sign is fixed so that its largest
coefficient is positive), each component is min-max scaled to [0, 1] and shown as R, G, B, upsampled
(bilinear) to the input size. With background removal the first component, oriented so that the
image border scores high, is thresholded (``> threshold`` after min-max scaling → background, black),
and the PCA is refitted on the foreground patches only, as in the Franca figures.

Usage::

    python -m franca.eval.visualize_pca --config-file D/config.yaml --pretrained-weights CKPT \\
        --output-dir OUT --remove-background IMAGE_OR_FOLDER [...]

writes ``OUT/<image stem>_pca.png`` per image and ``OUT/pca_grid.png`` (input | PCA, one row per image).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from franca.data.transforms import make_normalize_transform
from franca.eval.setup import get_args_parser as get_setup_args_parser
from franca.eval.setup import setup_and_build_model
from franca.utils.cli import run_cli

logger = logging.getLogger("franca")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
GRID_FILENAME = "pca_grid.png"


def principal_components(features: torch.Tensor, n_components: int = 3) -> torch.Tensor:
    """Projections (N, n_components) of the centred rows of ``features`` (N, D) on their top principal axes.

    Missing components (fewer than ``n_components`` rows or columns) are zeros.
    """
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    axes = vh[:n_components]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    projections = centred @ (axes * signs).T
    return F.pad(projections, (0, n_components - projections.shape[1])).float()


def _minmax(values: torch.Tensor) -> torch.Tensor:
    """Per-column scaling to [0, 1] (constant columns → 0)."""
    low, high = values.min(dim=0).values, values.max(dim=0).values
    return (values - low) / (high - low).clamp_min(1e-12)


def _border(rows: int, cols: int) -> torch.Tensor:
    mask = torch.ones(rows, cols, dtype=torch.bool)
    mask[1:-1, 1:-1] = False
    return mask.flatten()


def pca_rgb(
    patch_features: torch.Tensor, grid: tuple[int, int], remove_background: bool = False, threshold: float = 0.35
) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB patch map (h, w, 3) in [0, 1] and background mask (h, w) from patch tokens (h·w, D)."""
    rows, cols = grid
    if patch_features.shape[0] != rows * cols:
        raise ValueError(f"{patch_features.shape[0]} patch features do not fill a {rows}x{cols} grid")
    projections = principal_components(patch_features)
    background = torch.zeros(rows * cols, dtype=torch.bool)
    rgb = _minmax(projections)
    if remove_background:
        first = rgb[:, 0]
        border = _border(rows, cols)
        if (~border).any() and first[border].mean() < first[~border].mean():
            first = 1.0 - first
        background = first > threshold
        foreground = ~background
        rgb = torch.zeros_like(rgb)
        if foreground.sum() > 1:
            rgb[foreground] = _minmax(principal_components(patch_features[foreground]))
    return rgb.view(rows, cols, 3), background.view(rows, cols)


def render(rgb: torch.Tensor, background: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """Upsample the patch map to ``size`` (H, W): bilinear colours, nearest-neighbour background in black."""
    colours = F.interpolate(rgb.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(background[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    colours = colours.clamp(0, 1).masked_fill(mask, 0.0)
    return Image.fromarray((colours.permute(1, 2, 0) * 255).round().byte().numpy())


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files given directly or found (sorted) in the given folders."""
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            images += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"image or folder not found: {path}")
    if not images:
        raise ValueError(f"no image files found in {[str(p) for p in paths]}")
    return images


@torch.no_grad()
def visualize_pca(
    model: torch.nn.Module,
    image_paths: Sequence[str | Path],
    output_dir: str | Path,
    image_size: int = 448,
    remove_background: bool = False,
    threshold: float = 0.35,
    device: torch.device | None = None,
) -> list[Path]:
    """Write one PCA picture per image and a grid of (input, PCA) pairs; returns the per-image files."""
    patch = model.patch_size
    side = image_size // patch * patch
    if side < patch:
        raise ValueError(f"--image-size {image_size} is smaller than the patch size {patch}")
    crop = transforms.Compose([transforms.Resize(side), transforms.CenterCrop(side)])
    to_input = transforms.Compose([transforms.ToTensor(), make_normalize_transform()])
    device = device or next(model.parameters()).device
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    written, pairs = [], []
    for path in list_images(image_paths):
        picture = crop(Image.open(path).convert("RGB"))
        tokens = model.forward_features(to_input(picture)[None].to(device))["x_norm_patchtokens"][0]
        rgb, background = pca_rgb(tokens.float().cpu(), (side // patch, side // patch), remove_background, threshold)
        pca_picture = render(rgb, background, (side, side))
        target = output_dir / f"{path.stem}_pca.png"
        pca_picture.save(target)
        written.append(target)
        pairs.append((picture, pca_picture))
    grid = Image.new("RGB", (2 * side, side * len(pairs)))
    for row, (picture, pca_picture) in enumerate(pairs):
        grid.paste(picture, (0, row * side))
        grid.paste(pca_picture, (side, row * side))
    grid.save(output_dir / GRID_FILENAME)
    logger.info("PCA pictures of %d images written to %s", len(written), output_dir)
    return written


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False)]
    parser = argparse.ArgumentParser(description="PCA pictures of patch features", parents=parents, add_help=add_help)
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--image-size", type=int, default=448, help="side of the centre crop (rounded to patches)")
    parser.add_argument("--remove-background", action="store_true", help="black out the background patches")
    parser.add_argument("--threshold", type=float, default=0.35, help="background threshold on the first component")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup = setup_and_build_model(args)
    visualize_pca(
        setup.backbone,
        args.images,
        args.output_dir,
        args.image_size,
        args.remove_background,
        args.threshold,
        setup.device,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
