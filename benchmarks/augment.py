"""Multi-crop augmentation (+ collate with CyclicMask): ours vs the reference torchvision pipeline.

The reference pipeline is rebuilt here from torchvision primitives with the reference parameters
(:func:`make_reference_augmentation`); both run on one thread on the same JPEG bytes, in
interleaved rounds, and the rows report images/s per core and the time ratio ours / reference. One more
row times ``train.batch_augmentation`` (decode + every crop of a batch on the GPU when there is one, else
on the CPU with one thread) against the same reference.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from benchmarks.common import median, peak_memory_mb, synchronize, time_fn
from franca.data.augmentations import DataAugmentationDINO
from franca.data.batch_augmentations import BatchAugmentationDINO, decode_batch
from franca.data.collate import collate_data_and_cast
from franca.data.masking import MaskingGenerator
from franca.data.transforms import make_normalize_transform


def synthetic_jpeg(width: int = 500, height: int = 375, seed: int = 0, quality: int = 90) -> bytes:
    """A natural-looking test photo: smooth random colour field + sensor-like noise, JPEG-encoded."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_reference_augmentation(
    global_crops_scale: Sequence[float] = (0.32, 1.0),
    local_crops_scale: Sequence[float] = (0.05, 0.32),
    local_crops_number: int = 8,
    global_crops_size: int = 224,
    local_crops_size: int = 98,
) -> Callable[[Image.Image], dict]:
    """The reference ``DataAugmentationDINO`` rebuilt from torchvision primitives (PIL in, float crops out).

    Its blur is ``RandomApply([GaussianBlur(9, (0.1, 2.0))], p=1 − p)`` for the requested
    p = 1.0 / 0.1 / 0.5 (global 1 / global 2 / local), exactly as the reference wraps it.
    """
    bicubic = T.InterpolationMode.BICUBIC

    def geometry(size, scale):
        return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=bicubic), T.RandomHorizontalFlip(0.5)])

    def blur(requested_p):
        return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=1 - requested_p)

    color = T.Compose(
        [
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
    )
    normalize = T.Compose([T.ToTensor(), make_normalize_transform()])
    geo_global, geo_local = (
        geometry(global_crops_size, global_crops_scale),
        geometry(local_crops_size, local_crops_scale),
    )
    global1 = T.Compose([color, blur(1.0), normalize])
    global2 = T.Compose([color, blur(0.1), T.RandomSolarize(threshold=128, p=0.2), normalize])
    local = T.Compose([color, blur(0.5), normalize])

    def augment(image: Image.Image) -> dict:
        crops = [global1(geo_global(image)), global2(geo_global(image))]
        return {
            "global_crops": crops,
            "global_crops_teacher": crops,
            "local_crops": [local(geo_local(image)) for _ in range(local_crops_number)],
            "offsets": (),
        }

    return augment


def _pipeline(augment: Callable, data: bytes, batch: int, collate: Callable | None) -> Callable[[], object]:
    def step():
        samples = [(augment(Image.open(io.BytesIO(data))), None) for _ in range(batch)]
        return collate(samples) if collate is not None else samples

    return step


def _batch_pipeline(data: bytes, batch: int, device: torch.device) -> Callable[[], object]:
    """``train.batch_augmentation``: decode the batch on ``device`` and render every crop there."""
    augment = BatchAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 98)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _ in range(batch)]

    def step():
        crops = augment(decode_batch(encoded, ["benchmark.jpg"] * batch, device))
        synchronize(device)
        return crops

    return step


def run(quick: bool = False) -> list[dict]:
    """Images/s per core of the reference vs our augmentation, alone and followed by the collate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = synthetic_jpeg()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        batch, rounds = (4, 3) if quick else (16, 7)
        n_tokens = (224 // 14) ** 2
        mask_generator = MaskingGenerator((16, 16), max_num_patches=0.5 * n_tokens, min_aspect=0.3)
        collate = partial(
            collate_data_and_cast,
            mask_ratio_tuple=(0.1, 0.65),
            mask_probability=0.5,
            dtype=torch.float32,
            n_tokens=n_tokens,
            mask_generator=mask_generator,
        )
        reference = make_reference_augmentation()
        ours = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 98, uint8_crops=True)
        workloads = {
            "augment_multicrop_2x224_8x98/reference": _pipeline(reference, data, batch, None),
            "augment_multicrop_2x224_8x98/ours": _pipeline(ours, data, batch, None),
            "augment+collate_cyclicmask/reference": _pipeline(reference, data, batch, collate),
            "augment+collate_cyclicmask/ours": _pipeline(ours, data, batch, collate),
            f"augment_batch_on_{device.type}/ours": _batch_pipeline(data, batch, device),
        }
        times: dict[str, list[float]] = {name: [] for name in workloads}
        for fn in workloads.values():
            fn()  # warm-up
        for _ in range(rounds):  # interleaved, so machine load hits both sides alike
            for name, fn in workloads.items():
                times[name] += time_fn(fn, warmup=0, repeats=1)
        rows = []
        for name in workloads:
            seconds = median(times[name])
            row = {
                "workload": name,
                "seconds": seconds / batch,
                "img_per_s": batch / seconds,
                "gflops": None,
                "peak_mem_mb": peak_memory_mb(),
                "threads": 1,
                "image": "500x375 JPEG",
            }
            if name.startswith("augment_batch_on_"):
                row["threads"] = "GPU" if device.type == "cuda" else 1
                row["ratio_vs_reference"] = seconds / median(times["augment_multicrop_2x224_8x98/reference"])
            elif name.endswith("/ours"):
                row["ratio_vs_reference"] = seconds / median(times[name.replace("/ours", "/reference")])
            rows.append(row)
        return rows
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    for row in run():
        print(row)
