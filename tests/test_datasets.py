"""Datasets read from tiny layouts written here: ImageNet (+ index CLI), ImageNet22k tars, LAION shards, image folders."""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from franca.data.datasets import LAION, UNLABELLED, ImageFolder, ImageNet, ImageNet22k, image_net, image_net_22k, laion
from franca.data.loaders import SamplerType, make_data_loader, make_dataset, parse_dataset_str

REPO_ROOT = Path(__file__).resolve().parents[1]


def encoded(value: int, fmt: str = "PNG", size: int = 8) -> bytes:
    """A solid image whose red channel is ``value`` (exact for PNG, within 3 for JPEG): items tell their file."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(buffer, format=fmt)
    return buffer.getvalue()


def red(image: Image.Image) -> int:
    return image.getpixel((2, 2))[0]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- ImageFolder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    write(root / "cat" / "a.png", encoded(10))
    write(root / "cat" / "nested" / "b.JPG", encoded(20, "JPEG"))
    write(root / "ant" / "c.png", encoded(30))
    write(root / "ant" / "notes.txt", b"not an image")
    write(root / "ant" / ".hidden.png", encoded(99))
    write(root / "dog" / "d.bmp", encoded(40, "BMP"))
    write(root / "dog" / "e.png", encoded(50))
    return root


def test_image_folder_classes_targets_and_images(image_folder: Path):
    dataset = make_dataset(f"ImageFolder:root={image_folder}")
    assert isinstance(dataset, ImageFolder)
    assert dataset.classes == ["ant", "cat", "dog"]
    assert len(dataset) == 5
    assert dataset.get_targets().tolist() == [0, 1, 1, 2, 2]
    items = [dataset[i] for i in range(len(dataset))]
    assert [t for _, t in items] == [0, 1, 1, 2, 2]
    assert all(img.mode == "RGB" for img, _ in items)
    reds = [red(img) for img, _ in items]
    assert reds[0] == 30 and reds[1] == 10 and abs(reds[2] - 20) <= 3 and reds[3:] == [40, 50]


def test_image_folder_applies_transforms(image_folder: Path):
    dataset = make_dataset(f"ImageFolder:root={image_folder}", transform=red, target_transform=lambda t: t * 100)
    assert dataset[0] == (30, 0)
    assert dataset[4] == (50, 200)


def test_corrupt_image_is_reported_once_and_replaced(image_folder: Path, caplog):
    bad = write(image_folder / "cat" / "a.png", b"\x89PNG\r\n\x1a\n truncated garbage")
    dataset = make_dataset(f"ImageFolder:root={image_folder}")
    index = [Path(p) for p, _ in dataset.samples].index(bad)
    with caplog.at_level(logging.WARNING):
        first = dataset[index]
        second = dataset[index]
    hits = [r for r in caplog.records if str(bad) in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.WARNING
    # replaced by the next sample, image and target together
    assert abs(red(first[0]) - 20) <= 3 and first[1] == 1
    assert red(second[0]) == red(first[0])


def test_all_unreadable_raises_a_clear_error(tmp_path: Path):
    write(tmp_path / "x" / "a.png", b"nope")
    write(tmp_path / "x" / "b.png", b"nope")
    dataset = ImageFolder(root=str(tmp_path))
    with pytest.raises(RuntimeError, match="could be read"):
        dataset[0]


def test_image_folder_bad_roots(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(f"ImageFolder:root={tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        make_dataset(f"ImageFolder:root={tmp_path}")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        make_dataset(f"ImageFolder:root={tmp_path}")


# ---------------------------------------------------------------- dataset strings


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "Name:key=value"),
        ("Imagefolder:root=/x", "did you mean 'ImageFolder'"),
        ("ImageNet21k:root=/x:extra=/y", "did you mean 'ImageNet22k'"),
        ("ImageFolder:/x", "expected key=value"),
        ("ImageFolder:root=", "expected key=value"),
        ("ImageFolder:rot=/x", "no key 'rot' \\(did you mean 'root'"),
        ("ImageFolder:root=/a:root=/b", "twice"),
        ("ImageNet:root=/x:extra=/y", "lacks split"),
        ("LAION", "lacks root"),
    ],
)
def test_bad_dataset_strings(text: str, message: str):
    with pytest.raises(ValueError, match=message):
        make_dataset(text)


def test_parse_dataset_str():
    assert parse_dataset_str("ImageNet:split=VAL:root=/r:extra=/e") == (
        "ImageNet",
        {"split": "VAL", "root": "/r", "extra": "/e"},
    )


# ---------------------------------------------------------------- ImageNet


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    root = tmp_path / "in1k"
    for class_id, numbers in {"n02": [5, 17], "n01": [3]}.items():
        for n in numbers:
            write(root / "train" / class_id / f"{class_id}_{n}.JPEG", encoded(n * 10, "JPEG"))
    write(root / "val" / "n01" / "ILSVRC2012_val_00000002.JPEG", encoded(100, "JPEG"))
    write(root / "val" / "n02" / "ILSVRC2012_val_00000001.JPEG", encoded(110, "JPEG"))
    for n in (1, 2, 3):
        write(root / "test" / f"ILSVRC2012_test_{n:08d}.JPEG", encoded(200 + n, "JPEG"))
    (root / "labels.txt").write_text("n01,tench, Tinca tinca\nn02,goldfish\n")
    return root


def test_imagenet_index_and_read(imagenet_root: Path, tmp_path: Path):
    extra = tmp_path / "extra"
    assert image_net.main(["--root", str(imagenet_root), "--extra", str(extra)]) == 0
    expected = [f"{kind}-{split}.npy" for split in ("TRAIN", "VAL") for kind in ("entries", "class-ids", "class-names")]
    assert sorted(p.name for p in extra.iterdir()) == sorted([*expected, "entries-TEST.npy"])
    train = make_dataset(f"ImageNet:split=TRAIN:root={imagenet_root}:extra={extra}")
    assert len(train) == 3
    assert train.get_targets().tolist() == [0, 1, 1]
    assert [
        abs(red(train[i][0]) - v) <= 3 for i, v in enumerate([30, 170, 50])
    ]  # sorted paths: n02_17 < n02_5 == [True] * 3
    assert [train[i][1] for i in range(3)] == [0, 1, 1]
    assert train.find_class_id(1) == "n02" and train.find_class_name(0) == "tench, Tinca tinca"
    assert train.get_class_name(2) == "goldfish"
    val = ImageNet(split="VAL", root=str(imagenet_root), extra=str(extra))
    assert [(abs(red(img) - v) <= 3, t) for (img, t), v in zip((val[0], val[1]), (100, 110))] == [(True, 0), (True, 1)]
    test = ImageNet(split=ImageNet.Split.TEST, root=str(imagenet_root), extra=str(extra))
    assert len(test) == 3 and test[2][1] == UNLABELLED and abs(red(test[2][0]) - 203) <= 3
    with pytest.raises(ValueError, match="no class names"):
        test.find_class_name(0)


def test_imagenet_pickles_without_its_memory_maps(imagenet_root: Path, tmp_path: Path):
    image_net.dump_extra(str(imagenet_root), str(tmp_path), "TRAIN")
    dataset = ImageNet(split="TRAIN", root=str(imagenet_root), extra=str(tmp_path))
    assert len(dataset) == 3
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._entries is None and len(clone) == 3 and clone[1][1] == 1


def test_imagenet_missing_index_names_the_command(imagenet_root: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="python -m franca.data.datasets.image_net --root"):
        make_dataset(f"ImageNet:split=TRAIN:root={imagenet_root}:extra={tmp_path / 'none'}")
    with pytest.raises(ValueError, match="not one of TRAIN, VAL, TEST"):
        make_dataset(f"ImageNet:split=TRAINING:root={imagenet_root}:extra={tmp_path}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(f"ImageNet:split=VAL:root={tmp_path / 'nope'}:extra={tmp_path}")


def test_imagenet_index_rejects_unofficial_file_names(imagenet_root: Path, tmp_path: Path):
    write(imagenet_root / "train" / "n01" / "holiday.JPEG", encoded(1, "JPEG"))
    with pytest.raises(ValueError, match="holiday.JPEG does not follow the official naming"):
        image_net.dump_extra(str(imagenet_root), str(tmp_path), "TRAIN")


def test_imagenet_index_command_runs_as_a_module(imagenet_root: Path, tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "franca.data.datasets.image_net", "--root", str(imagenet_root), "--splits", "VAL"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "VAL: 2 images indexed" in done.stdout
    assert (imagenet_root / "entries-VAL.npy").is_file()


# ---------------------------------------------------------------- ImageNet22k


@pytest.fixture
def in22k_root(tmp_path: Path) -> Path:
    root = tmp_path / "in22k"
    root.mkdir()
    long_name = "sub/" + "x" * 120 + ".JPEG"  # needs an extended header: data is not at header + 512
    members = {
        "n09": [("n09_1.JPEG", encoded(11, "JPEG")), (long_name, encoded(22, "JPEG"))],
        "n03": [("n03_1.JPEG", encoded(33, "JPEG")), ("n03_2.JPEG", gzip.compress(encoded(44, "JPEG")))],
    }
    for class_id, files in members.items():
        with tarfile.open(root / f"{class_id}.tar", "w", format=tarfile.PAX_FORMAT) as archive:
            for name, data in files:
                add_member(archive, name, data)
    return root


def test_imagenet22k_index_and_read(in22k_root: Path, tmp_path: Path):
    extra = tmp_path / "extra22k"
    assert image_net_22k.main(["--root", str(in22k_root), "--extra", str(extra)]) == 0
    dataset = make_dataset(f"ImageNet22k:root={in22k_root}:extra={extra}")
    assert isinstance(dataset, ImageNet22k)
    assert len(dataset) == 4
    assert dataset.get_targets().tolist() == [0, 0, 1, 1]
    assert [dataset.find_class_id(i) for i in (0, 1)] == ["n03", "n09"]
    expected = [33, 44, 11, 22]
    for i, value in enumerate(expected):
        image, target = dataset[i]
        assert abs(red(image) - value) <= 3 and target == dataset.get_targets()[i]


def test_imagenet22k_reads_official_block_offsets(in22k_root: Path, tmp_path: Path):
    """Official index files end each entry at the next header block (data + zero padding)."""
    image_net_22k.dump_extra(str(in22k_root), str(tmp_path))
    entries = np.load(tmp_path / "entries.npy")
    entries["end_offset"] = (entries["end_offset"] + 511) // 512 * 512
    np.save(tmp_path / "entries.npy", entries)
    dataset = ImageNet22k(root=str(in22k_root), extra=str(tmp_path))
    assert [abs(red(dataset[i][0]) - v) <= 3 for i, v in enumerate([33, 44, 11, 22])] == [True] * 4


def test_imagenet22k_corrupt_member_is_named(in22k_root: Path, tmp_path: Path, caplog):
    with tarfile.open(in22k_root / "n03.tar", "w") as archive:
        add_member(archive, "n03_1.JPEG", b"\xff\xd8 broken jpeg")
        add_member(archive, "n03_2.JPEG", encoded(44, "JPEG"))
    image_net_22k.dump_extra(str(in22k_root), str(tmp_path))
    dataset = ImageNet22k(root=str(in22k_root), extra=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        image, target = dataset[0]
    assert abs(red(image) - 44) <= 3 and target == 0
    assert any(f"{in22k_root / 'n03.tar'}:n03_1.JPEG" in r.getMessage() for r in caplog.records)


def test_imagenet22k_missing_index(in22k_root: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="python -m franca.data.datasets.image_net_22k"):
        make_dataset(f"ImageNet22k:root={in22k_root}:extra={tmp_path}")
    with pytest.raises(FileNotFoundError, match="no <class>.tar"):
        image_net_22k.dump_extra(str(tmp_path), str(tmp_path))


# ---------------------------------------------------------------- LAION


def write_shards(
    root: Path, shard_sizes: list[int], corrupt: set[int] = frozenset(), labelled: bool = True
) -> list[int]:
    """Shards of webdataset samples; sample ``v`` has red value ``v`` and label ``v % 5``. Returns all values."""
    root.mkdir(parents=True, exist_ok=True)
    value = 0
    for shard, size in enumerate(shard_sizes):
        with tarfile.open(root / f"shard-{shard:03d}.tar", "w") as archive:
            for _ in range(size):
                key = f"{value:06d}"
                image = b"garbage" if value in corrupt else encoded(value)
                add_member(archive, f"{key}.png" if value % 2 else f"{key}.jpg", image)
                if labelled:
                    add_member(archive, f"{key}.cls", str(value % 5).encode())
                add_member(archive, f"{key}.txt", b"a caption")
                value += 1
    (root / "readme.md").write_text("not a shard")
    return list(range(value))


def test_laion_single_pass_covers_every_sample_with_labels(tmp_path: Path):
    all_values = write_shards(tmp_path / "laion", [3, 4, 2])
    dataset = make_dataset(f"LAION:root={tmp_path / 'laion'}")
    assert isinstance(dataset, LAION)
    dataset.infinite = False
    items = list(dataset)
    assert sorted(red(img) for img, _ in items) == all_values
    assert all(target == red(img) % 5 for img, target in items)


def test_laion_without_labels_is_unlabelled(tmp_path: Path):
    write_shards(tmp_path / "laion", [2], labelled=False)
    dataset = LAION(root=str(tmp_path / "laion"), infinite=False)
    assert [t for _, t in dataset] == [UNLABELLED, UNLABELLED]


@pytest.mark.parametrize("shard_sizes,world_size", [([3, 4, 2, 5, 1], 2), ([4, 3], 3)])
def test_laion_ranks_are_disjoint_and_cover(tmp_path: Path, monkeypatch, shard_sizes, world_size):
    all_values = write_shards(tmp_path / "laion", shard_sizes)
    per_rank = []
    for rank in range(world_size):
        monkeypatch.setattr(laion, "rank_and_world_size", lambda rank=rank: (rank, world_size))
        dataset = LAION(root=str(tmp_path / "laion"), infinite=False)
        per_rank.append(sorted(red(img) for img, _ in dataset))
    assert sorted(itertools.chain.from_iterable(per_rank)) == all_values
    assert all(per_rank)


def test_laion_workers_are_disjoint_and_cover(tmp_path: Path):
    all_values = write_shards(tmp_path / "laion", [3, 3, 2, 4])
    dataset = LAION(root=str(tmp_path / "laion"), infinite=False, transform=red)
    loader = make_data_loader(dataset, 2, 2, sampler_type=SamplerType.MULTISHARDSTREAMER, drop_last=False)
    assert sorted(itertools.chain.from_iterable(batch[0].tolist() for batch in loader)) == all_values


@pytest.mark.parametrize("num_workers", [0, 2])
def test_laion_resume_continues_the_stream_exactly(tmp_path: Path, num_workers: int):
    write_shards(tmp_path / "laion", [5, 3, 4, 6])
    batch = 3

    def batches(advance: int, count: int) -> list[list[int]]:
        dataset = LAION(root=str(tmp_path / "laion"), transform=red)
        loader = make_data_loader(
            dataset, batch, num_workers, seed=4, sampler_type=SamplerType.MULTISHARDSTREAMER, sampler_advance=advance
        )
        return [b[0].tolist() for b in itertools.islice(loader, count)]

    reference = batches(0, 14)
    assert batches(5 * batch, 9) == reference[5:]
    if num_workers == 0:  # one consumer: consecutive passes over the 18 samples, each complete, orders differ
        flat = list(itertools.chain.from_iterable(reference))
        assert sorted(flat[:18]) == sorted(flat[18:36]) == list(range(18))
        assert flat[:18] != flat[18:36]


def test_laion_resume_with_workers_needs_whole_batches(tmp_path: Path):
    write_shards(tmp_path / "laion", [4, 4])
    dataset = LAION(root=str(tmp_path / "laion"))
    loader = make_data_loader(dataset, 3, 2, sampler_type=SamplerType.MULTISHARDSTREAMER, sampler_advance=4)
    with pytest.raises(ValueError, match="not a multiple of batch size"):
        next(iter(loader))


def test_laion_corrupt_sample_is_named_and_replaced(tmp_path: Path, caplog):
    write_shards(tmp_path / "laion", [4], corrupt={1})
    dataset = LAION(root=str(tmp_path / "laion"), infinite=False)
    dataset.configure_stream(shuffle=False)
    with caplog.at_level(logging.WARNING):
        items = list(dataset)
    assert [red(img) for img, _ in items] == [0, 2, 2, 3]
    assert [t for _, t in items] == [0, 2, 2, 3]
    assert any(f"{tmp_path / 'laion' / 'shard-000.tar'}:000001" in r.getMessage() for r in caplog.records)


def test_laion_rejects_map_style_samplers_and_bad_roots(tmp_path: Path):
    write_shards(tmp_path / "laion", [2])
    dataset = LAION(root=str(tmp_path / "laion"))
    with pytest.raises(ValueError, match="MULTISHARDSTREAMER"):
        make_data_loader(dataset, 2, 0, sampler_type=SamplerType.EPOCH)
    with pytest.raises(FileNotFoundError, match="no \\*.tar shards"):
        make_dataset(f"LAION:root={tmp_path}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(f"LAION:root={tmp_path / 'nothing'}")
