"""Linear probes: the shared feature vector, the classifier grid, training, best head, resuming."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from franca.eval import linear
from franca.eval.linear import (
    BEST_CLASSIFIER_FILENAME,
    CHECKPOINT_FILENAME,
    RESULTS_FILENAME,
    IntermediateLayerFeatures,
    build_classifier_grid,
    classifier_name,
    run_linear_eval,
)
from franca.models.vision_transformer import DinoVisionTransformer


def _tiny_vit(registers: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(0)
    return DinoVisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, block_chunks=0, num_register_tokens=registers
    ).eval()


def _dinov2_linear_input(outputs, n: int, avgpool: bool) -> torch.Tensor:
    """DINOv2's rule, written out: class tokens of the last n blocks, then the last block's mean patch token."""
    parts = [cls for _, cls in outputs[-n:]]
    if avgpool:
        parts.append(outputs[-1][0].mean(dim=1))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("registers", [0, 2])
def test_each_classifier_sees_the_dinov2_input(registers):
    model = _tiny_vit(registers)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        shared = IntermediateLayerFeatures(model, 4)(images)
        outputs = model.get_intermediate_layers(images, 4, return_class_token=True)
    assert shared.shape == (3, 5 * 32)
    grid, groups = build_classifier_grid(
        32, num_classes=5, learning_rates=[1e-3], n_last_blocks_list=[1, 4], lr_scale=2.0
    )
    assert list(grid) == [classifier_name(n, a, 2e-3) for n in (1, 4) for a in (False, True)]
    assert [g["lr"] for g in groups] == [2e-3] * 4
    for head in grid.values():
        expected = _dinov2_linear_input(outputs, head.n_last_blocks, head.avgpool)
        torch.testing.assert_close(shared[:, head.start : head.stop], expected)
        assert head.linear.in_features == expected.shape[1]


def test_classifier_names_and_init():
    assert classifier_name(4, True, 0.0125) == "classifier_4_blocks_avgpool_True_lr_0_01250"
    grid, _ = build_classifier_grid(16, 3, [1e-3], [1], 1.0)
    head = next(iter(grid.values()))
    assert head.linear.bias.abs().max() == 0 and 0.005 < head.linear.weight.std() < 0.02
    with pytest.raises(ValueError, match="cannot use the last 5 blocks of a 4-block backbone"):
        IntermediateLayerFeatures(_tiny_vit(), 5)


def _colour_split(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(2).repeat(n)
    base = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])[labels]
    return TensorDataset(base[:, :, None, None] + 0.2 * torch.randn(len(labels), 3, 16, 16, generator=g), labels)


_GRID = dict(learning_rates=[0.01, 0.1], n_last_blocks_list=[1, 4], batch_size=8, augmented_train=False)


def test_probe_learns_two_colours_and_saves_the_best_head(tmp_path):
    results = run_linear_eval(_tiny_vit(), _colour_split(16, 0), _colour_split(8, 1), tmp_path, epochs=3, **_GRID)
    assert results["top-1"] == 100.0 and len(results["classifiers"]) == 8
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    assert json.loads((tmp_path / RESULTS_FILENAME).read_text())["best_classifier"] == results["best_classifier"]
    best = torch.load(tmp_path / BEST_CLASSIFIER_FILENAME, weights_only=True)
    assert best["name"] == results["best_classifier"] and best["num_classes"] == 2
    in_dim = (best["n_last_blocks"] + int(best["avgpool"])) * 32
    assert best["state_dict"]["weight"].shape == (2, in_dim)


def test_interrupted_run_resumes_to_the_same_classifiers(tmp_path, monkeypatch):
    train, val = _colour_split(12, 0), _colour_split(4, 1)
    straight = run_linear_eval(_tiny_vit(), train, val, tmp_path / "a", epochs=3, **_GRID)
    state_a = torch.load(tmp_path / "a" / CHECKPOINT_FILENAME, weights_only=True)

    real_train = linear._train_one_epoch
    calls = []

    def crash_on_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(linear, "_train_one_epoch", crash_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_linear_eval(_tiny_vit(), train, val, tmp_path / "b", epochs=3, **_GRID)
    assert torch.load(tmp_path / "b" / CHECKPOINT_FILENAME, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(linear, "_train_one_epoch", real_train)
    resumed = run_linear_eval(_tiny_vit(), train, val, tmp_path / "b", epochs=3, **_GRID)
    state_b = torch.load(tmp_path / "b" / CHECKPOINT_FILENAME, weights_only=True)
    for key, value in state_a["classifiers"].items():
        torch.testing.assert_close(state_b["classifiers"][key], value)
    assert resumed["classifiers"] == straight["classifiers"]

    other_grid = dict(_GRID, learning_rates=[0.5])
    with pytest.raises(ValueError, match="written for another classifier grid"):
        run_linear_eval(_tiny_vit(), train, val, tmp_path / "b", epochs=3, **other_grid)


def test_augmented_training_reextracts_each_epoch(tmp_path, monkeypatch):
    calls = []
    real_extract = linear.extract_features

    def counting(model, dataset, *args, **kwargs):
        calls.append(dataset)
        return real_extract(model, dataset, *args, **kwargs)

    monkeypatch.setattr(linear, "extract_features", counting)
    train, val = _colour_split(4, 0), _colour_split(2, 1)
    grid = dict(_GRID, augmented_train=True)
    run_linear_eval(_tiny_vit(), train, val, tmp_path, epochs=3, **grid)
    assert sum(d is train for d in calls) == 3 and sum(d is val for d in calls) == 1
