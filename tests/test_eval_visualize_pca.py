"""PCA pictures: principal components, background removal, PNG files of the right size."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from franca.eval.visualize_pca import list_images, pca_rgb, principal_components, render, visualize_pca


def test_principal_components_match_covariance_eigenvectors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    proj = principal_components(x, 3)
    centred = (x - x.mean(0)).double()
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred)
    top = eigvecs[:, eigvals.argsort(descending=True)[:3]]
    torch.testing.assert_close(proj.double().abs(), (centred @ top).abs(), atol=1e-4, rtol=1e-4)
    # decreasing variance, and the sign rule makes each axis' largest coefficient positive
    assert (proj.var(0)[:-1] >= proj.var(0)[1:]).all()
    assert torch.equal(principal_components(x, 3), principal_components(x.clone(), 3))
    assert principal_components(x[:2], 3)[:, 2].abs().max() == 0  # a missing component is zeros


def _object_on_background(rows: int = 8, cols: int = 8, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inside = torch.zeros(rows, cols, dtype=torch.bool)
    inside[2:6, 3:7] = True
    centres = torch.randn(2, dim, generator=g) * 3
    features = centres[inside.flatten().long()] + 0.3 * torch.randn(rows * cols, dim, generator=g)
    return features, inside


def test_background_removal_blacks_out_the_surroundings():
    features, inside = _object_on_background()
    rgb, background = pca_rgb(features, (8, 8), remove_background=True)
    assert torch.equal(background, ~inside)
    assert rgb[background].abs().max() == 0
    assert rgb[~background].max() == pytest.approx(1.0) and rgb[~background].min() == pytest.approx(0.0)
    plain, no_background = pca_rgb(features, (8, 8), remove_background=False)
    assert not no_background.any() and plain.shape == (8, 8, 3)
    assert plain.min() >= 0 and plain.max() <= 1
    with pytest.raises(ValueError, match="64 patch features do not fill a 7x8 grid"):
        pca_rgb(features, (7, 8))


def test_render_size_and_black_background():
    features, inside = _object_on_background()
    rgb, background = pca_rgb(features, (8, 8), remove_background=True)
    picture = render(rgb, background, (64, 64))
    assert picture.size == (64, 64) and picture.mode == "RGB"
    assert picture.getpixel((0, 0)) == (0, 0, 0)


class _PatchModel(torch.nn.Module):
    """forward_features → patch tokens = a linear map of each 4×4 patch's pixels."""

    patch_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 16, kernel_size=4, stride=4)

    def forward_features(self, images: torch.Tensor) -> dict:
        return {"x_norm_patchtokens": self.proj(images).flatten(2).transpose(1, 2)}


def test_visualize_pca_writes_pngs_of_the_crop_size(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        picture = Image.new("RGB", (50, 40), (20, 20, 20))
        picture.paste(Image.new("RGB", (20, 16), colour), (15, 12))
        picture.save(folder / f"img{i}.png")
    torch.manual_seed(0)
    written = visualize_pca(_PatchModel(), [folder], tmp_path / "out", image_size=30, remove_background=True)
    assert [p.name for p in written] == ["img0_pca.png", "img1_pca.png"]
    for path in written:
        with Image.open(path) as picture:
            assert picture.size == (28, 28)  # 30 rounded down to a multiple of the 4-px patch
    with Image.open(tmp_path / "out" / "pca_grid.png") as grid:
        assert grid.size == (2 * 28, 2 * 28)
    with pytest.raises(FileNotFoundError, match="image or folder not found"):
        list_images([tmp_path / "missing.png"])
