"""``LAION:root=DIR``: webdataset tar shards ``DIR/*.tar``, streamed sample by sample.

A sample is the run of consecutive tar members sharing a key (the member path up to the first dot of
its file name): one image (``jpg``, ``jpeg``, ``png``, ``webp``, …) plus an optional ``cls`` member
holding an integer label; other members (``txt``, ``json``) are ignored. Items are ``(image, target)``
with target ``UNLABELLED`` (-1) when there is no ``cls``.

Shards are dealt to ranks and DataLoader workers by :class:`~franca.data.samplers.ShardStreamSampler`.
An unreadable image is reported once and replaced by the next readable sample of the same stream.
"""

from __future__ import annotations

import itertools
import logging
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from franca.data.datasets.decoders import decode_image, warn_unreadable
from franca.data.datasets.extended import UNLABELLED
from franca.data.samplers import ShardStreamSampler, rank_and_world_size

logger = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif"})


@dataclass
class _RawSample:
    source: str
    image: bytes
    target: int


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _parse_label(data: bytes, source: str) -> int:
    text = data.decode("utf-8", errors="replace").strip()
    try:
        return int(text)
    except ValueError:
        logger.warning("label of %s is not an integer (%r): sample kept as unlabelled", source, text[:40])
        return UNLABELLED


def _read_shard(path: str) -> Iterator[_RawSample]:
    """The samples of one shard, in tar order, without decoding the images."""
    key, image, target, source = None, None, UNLABELLED, path

    def finish() -> _RawSample | None:
        if key is None:
            return None
        if image is None:
            warn_unreadable(source, ValueError("sample has no image member"))
            return None
        return _RawSample(source, image, target)

    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, extension = _split_key(member.name)
                if member_key != key:
                    done = finish()
                    if done is not None:
                        yield done
                    key, image, target, source = member_key, None, UNLABELLED, f"{path}:{member_key}"
                tail = extension.rpartition(".")[2]
                if tail in _IMAGE_EXTENSIONS and image is None:
                    image = archive.extractfile(member).read()
                elif tail == "cls":
                    target = _parse_label(archive.extractfile(member).read(), source)
    except (tarfile.TarError, OSError) as error:
        warn_unreadable(path, error)
    done = finish()
    if done is not None:
        yield done


class LAION(IterableDataset):
    """Streamed webdataset shards; endless (reshuffled shard order each pass) unless ``infinite=False``."""

    def __init__(
        self,
        *,
        root: str,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        infinite: bool = True,
    ) -> None:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"LAION root {str(folder)!r} does not exist or is not a directory")
        self.shards = sorted(str(p) for p in folder.glob("*.tar"))
        if not self.shards:
            raise FileNotFoundError(f"LAION root {str(folder)!r} holds no *.tar shards")
        self.root = str(folder)
        self.transform = transform
        self.target_transform = target_transform
        self.infinite = infinite
        self._seed = 0
        self._shuffle = True
        self._advance = 0
        self._batch_size = 1

    def configure_stream(self, *, seed: int = 0, shuffle: bool = True, advance: int = 0, batch_size: int = 1) -> None:
        """Set the shard-order seed and the resume point: ``advance`` samples already consumed by this rank,
        delivered in batches of ``batch_size``. With several DataLoader workers ``advance`` must be a whole
        number of batches (the loader hands out batches round-robin over workers)."""
        if advance < 0 or batch_size < 1:
            raise ValueError(f"stream advance must be >= 0 and batch_size >= 1, got {advance} and {batch_size}")
        self._seed, self._shuffle, self._advance, self._batch_size = seed, shuffle, advance, batch_size

    def _consumer(self) -> tuple[int, int, int]:
        """``(consumer index, consumer count, samples to skip)`` of this rank/worker after resume."""
        rank, world_size = rank_and_world_size()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers == 1:
            return rank, world_size, self._advance
        batches_done, remainder = divmod(self._advance, self._batch_size)
        if remainder:
            raise ValueError(
                f"stream advance {self._advance} is not a multiple of batch size {self._batch_size}; "
                "resume with whole batches when using several workers"
            )
        # The loader's first batch comes from worker 0, which must continue the stream that produced
        # batch `batches_done` of the interrupted run: rotate worker roles accordingly.
        role = (worker + batches_done) % workers
        batches_of_role = max(0, -(-(batches_done - role) // workers))
        return rank * workers + role, world_size * workers, batches_of_role * self._batch_size

    def _raw_stream(self, sampler: ShardStreamSampler) -> Iterator[_RawSample]:
        for epoch, plan in enumerate(sampler.plans(self.infinite)):
            samples = itertools.chain.from_iterable(_read_shard(self.shards[i]) for i in plan.shards)
            count = 0
            for sample in itertools.islice(samples, plan.sample_offset, None, plan.sample_stride):
                count += 1
                yield sample
            if count == 0 and self.infinite:
                raise RuntimeError(
                    f"LAION stream consumer got no sample in pass {epoch} over {len(self.shards)} shard(s) under "
                    f"{self.root}: too few samples for the number of ranks x DataLoader workers"
                )

    @staticmethod
    def _decoded(raw: Iterable[_RawSample]) -> Iterator[tuple[Any, int]]:
        """Decode images; each unreadable one is replaced by the next readable sample (the last one at the end)."""
        pending = 0
        last = None
        for sample in raw:
            try:
                image = decode_image(sample.image)
            except Exception as error:  # any decoder failure means the same thing: use another sample
                warn_unreadable(sample.source, error)
                pending += 1
                continue
            last = (image, sample.target)
            for _ in range(pending + 1):
                yield image, sample.target
            pending = 0
        if pending:
            if last is None:
                raise RuntimeError("no readable image in the LAION shards")
            for _ in range(pending):
                yield last

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        consumer, consumer_count, skip = self._consumer()
        sampler = ShardStreamSampler(
            shard_count=len(self.shards),
            consumer=consumer,
            consumer_count=consumer_count,
            shuffle=self._shuffle,
            seed=self._seed,
        )
        raw = itertools.islice(self._raw_stream(sampler), skip, None)
        for image, target in self._decoded(raw):
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            yield image, target
