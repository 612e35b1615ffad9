"""RASA post-training end to end on a tiny ViT and a small image set: outputs, real effect, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from franca.models.vision_transformer import DinoVisionTransformer
from rasa.data import image_files_under, make_rasa_val_transform
from rasa.fold import load_folded_backbone
from rasa.src.rasa_head import load_rasa_head
from rasa.train import load_rasa_config, main

ARCH = dict(
    img_size=64,
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=2,
    block_chunks=0,
    init_values=1.0,
    ffn_layer="swiglufused",
)
CLASSES = ("warm", "cold")


def _write_images(root, per_class: int, seed: int) -> None:
    """Smooth random images, tinted per class (so the class token separates the classes)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            low = rng.normal(size=(8, 8, 3))
            low[..., 0 if c == 0 else 2] += 1.5
            image = Image.fromarray(np.uint8(np.clip(low * 40 + 128, 0, 255))).resize((80, 80), Image.BICUBIC)
            image.save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One RASA run (8 iterations) on a random tiny ViT whose position embedding is strong."""
    root = tmp_path_factory.mktemp("rasa")
    _write_images(root / "data" / "train", 24, seed=0)
    _write_images(root / "data" / "val", 12, seed=1)
    torch.manual_seed(0)
    model = DinoVisionTransformer(**ARCH)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, root / "backbone.pth")
    config = root / "rasa.yaml"
    config.write_text(
        "backbone:\n  arch: DinoVisionTransformer\n  kwargs: {embed_dim: 64, depth: 2, num_heads: 2}\n"
        "data:\n  dataset_name: folder\n  size_crops: 64\n  size_crops_val: 64\n"
    )
    main(
        [
            "--config",
            str(config),
            f"backbone.weights={root / 'backbone.pth'}",
            "backbone.img_size=64",
            "backbone.patch_size=8",
            "backbone.block_chunks=0",
            "backbone.init_values=1.0",
            f"data.data_dir={root / 'data' / 'train'}",
            f"data.val_data_dir={root / 'data' / 'val'}",
            f"train.output_dir={root / 'out'}",
            "train.batch_size=4",
            "train.max_epochs=20",
            "train.lr_heads=0.05",
            "train.end_pos_layers=8",
            "val.probe_images=32",
            "num_workers=0",
        ]
    )
    return root


def test_outputs_per_iteration(run_dir):
    out = run_dir / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["stage"] == "backbone"
    assert [r["iteration"] for r in records[1:]] == list(range(8))
    for i, record in enumerate(records[1:]):
        assert record["n_pos_layers"] == i
        assert {"val/mse_loss", "val/mse_loss_pos_x", "val/mse_loss_no_pos_x", "val/pos_x_to_pos_emb_sim"} <= set(
            record
        )
        head = load_rasa_head(out / f"rasa_head_iter{i:02d}.pth", input_dim=64)
        assert head.n_pos_layers == i
    # the first fit learns position: its read-out beats the constant prediction (variance 0.1094 for 8 positions)
    assert records[1]["train_loss"] < 0.08
    assert (out / "config.yaml").is_file() and (out / "rasa_head.pth").is_file()


def test_rasa_removes_linearly_decodable_position(run_dir):
    records = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    before, after = records[0]["probe_r2"], records[-1]["probe_r2"]
    assert before > 0.5
    assert after <= 0.2 * before


def _cls_features(model, root):
    transform = make_rasa_val_transform(64)
    files = image_files_under(root)
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([CLASSES.index(f.split("/")[-2]) for f in files])
    with torch.no_grad():
        out = model.forward_features(images)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"], labels


def _knn_accuracy(train, train_labels, test, test_labels, k=5) -> float:
    sims = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    votes = train_labels[sims.topk(k, dim=1).indices]
    return (votes.mode(dim=1).values == test_labels).float().mean().item()


def test_folded_checkpoint_keeps_class_token_and_debiases_patches(run_dir):
    plain = load_folded_backbone(run_dir / "backbone.pth", "DinoVisionTransformer", **ARCH).eval()
    folded = load_folded_backbone(run_dir / "out" / "folded_teacher_checkpoint.pth", "DinoVisionTransformer", **ARCH)
    head = load_rasa_head(run_dir / "out" / "rasa_head.pth", input_dim=64)
    data = run_dir / "data"
    cls_tr, _, y_tr = _cls_features(plain, data / "train")
    cls_te, patch_te, y_te = _cls_features(plain, data / "val")
    f_cls_tr, _, _ = _cls_features(folded.eval(), data / "train")
    f_cls_te, f_patch_te, _ = _cls_features(folded, data / "val")
    torch.testing.assert_close(f_cls_te, cls_te, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(f_patch_te, head(patch_te), atol=1e-5, rtol=1e-5)
    accuracy = _knn_accuracy(cls_tr, y_tr, cls_te, y_te)
    assert accuracy == _knn_accuracy(f_cls_tr, y_tr, f_cls_te, y_te)
    assert accuracy > 0.5


def test_config_errors(tmp_path):
    from franca.utils.config import ConfigError

    with pytest.raises(
        ConfigError,
        match="unknown RASA config key 'train.lr_head' in the command-line overrides; did you mean 'train.lr_heads'",
    ):
        load_rasa_config(None, ["data.data_dir=x", "train.lr_head=0.1"])
    with pytest.raises(ConfigError, match="data.data_dir is not set"):
        load_rasa_config(None, [])
    with pytest.raises(FileNotFoundError, match="RASA config file not found"):
        load_rasa_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="start_pos_layers < train.end_pos_layers"):
        load_rasa_config(None, ["data.data_dir=x", "train.start_pos_layers=3", "train.end_pos_layers=3"])


def _write_voc(root, n: int) -> None:
    """A tiny Pascal VOC layout: images, trainaug/val split files, masks with two classes and 255 borders."""
    rng = np.random.default_rng(2)
    for folder in ("images", "SegmentationClass", "SegmentationClassAug", "sets"):
        (root / folder).mkdir(parents=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    for i in ids:
        mask = np.zeros((80, 80), dtype=np.uint8)
        mask[:, 40:] = 1
        mask[:, 39:41] = 255
        image = rng.normal(128, 20, size=(80, 80, 3))
        image[mask == 1] += 60
        Image.fromarray(np.uint8(np.clip(image, 0, 255))).save(root / "images" / f"{i}.jpg")
        for folder in ("SegmentationClass", "SegmentationClassAug"):
            Image.fromarray(mask).save(root / folder / f"{i}.png")
    for split in ("trainaug", "val"):
        (root / "sets" / f"{split}.txt").write_text("\n".join(ids) + "\n")


@pytest.fixture
def single_thread_faiss():
    """faiss' OpenMP threads spin badly on a shared 2-core machine; one thread is fast for these tiny clusterings."""
    faiss = pytest.importorskip("faiss")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def test_voc_run_without_feature_cache_reports_kmeans_miou(run_dir, tmp_path, single_thread_faiss):
    _write_voc(tmp_path / "voc", 8)
    out = tmp_path / "out"
    main(
        [
            "--config",
            str(run_dir / "rasa.yaml"),
            f"backbone.weights={run_dir / 'backbone.pth'}",
            "backbone.img_size=64",
            "backbone.patch_size=8",
            "backbone.block_chunks=0",
            "backbone.init_values=1.0",
            "data.dataset_name=voc",
            f"data.data_dir={tmp_path / 'voc'}",
            f"data.voc_data_path={tmp_path / 'voc'}",
            "data.num_classes=2",
            f"train.output_dir={out}",
            "train.batch_size=4",
            "train.max_epochs=2",
            "train.end_pos_layers=2",
            "train.feature_cache=none",
            "train.save_folded=false",
            "val.val_batch_size=4",
            "val.val_iters_u_segm=1",
            "val.val_downsample_masks=false",
            "val.num_clusters_kmeans_miou=[2,4]",
            "val.probe_images=0",
            "num_workers=0",
        ]
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["val/x/K=2_miou"] > 0.5
    assert {"val/no_pos_x/K=2_miou", "val/pos_x/K=4_prec_miou"} <= set(records[-1])
    assert records[-1]["probe_r2"] is None and not (out / "folded_teacher_checkpoint.pth").exists()


def test_config_values_are_typed_through_the_franca_loader():
    from franca.utils.config import ConfigError

    cfg = load_rasa_config(
        None, ["data.data_dir=x", "val.val_iters=null", "backbone.kwargs.depth=2", "train.lr_heads=1"]
    )
    assert cfg.val.val_iters is None and cfg.backbone.kwargs.depth == 2 and cfg.train.lr_heads == 1.0
    with pytest.raises(ConfigError, match="config key 'train.max_epochs' in the command-line overrides must be int"):
        load_rasa_config(None, ["data.data_dir=x", "train.max_epochs=many"])
