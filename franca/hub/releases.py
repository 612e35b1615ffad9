"""The release table: which (architecture, weights) the official GitHub releases publish, and where.

Source: valeoai/Franca ``franca/hub/backbones.py`` (``Weights``, ``_WEIGHT_SPECS``) and ``release_checkpoints.md``.
Release v1.0.0 published the first backbones; v1.1.0 added 224 px and 518 px variants and republished the DINOv2
IN-21K baselines. Each entry gives the native image size (the grid of the file's ``pos_embed`` divided by the patch
size), the release tag and whether a RASA head file is published beside the backbone. File names are built as the
upstream hub builds them::

    franca_{vitb|vitl|vitg}{patch}_{weights.value}[_rasa].pth    (ViT-g: ..._chunked.tar.gz.part_{aa,ab,ac})

Withdrawn or incomplete combinations are not in the table; :mod:`franca.hub.release_caveats` says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

RELEASES_URL = "https://github.com/valeoai/Franca/releases/download"
VITG_PIECES = ("chunked.tar.gz.part_aa", "chunked.tar.gz.part_ab", "chunked.tar.gz.part_ac")


class Weights(Enum):
    """Released pretraining runs (the value is the name used in the release file names)."""

    IN21K = "In21K"
    IN21K_224 = "In21K_224"
    LAION = "Laion600M"
    LAION_224 = "Laion600M_224"
    DINOV2_IN21K = "Dinov2_In21K"
    DINOV2_IN21K_518 = "Dinov2_In21K_518"
    LAION_518 = "Laion_518"


@dataclass(frozen=True)
class Release:
    """One published backbone: native image size, release tag, and whether a RASA head file is published."""

    img_size: int
    tag: str
    rasa: bool = True


RELEASES: dict[tuple[str, Weights], Release] = {
    ("vit_base", Weights.IN21K): Release(518, "v1.0.0"),
    ("vit_base", Weights.IN21K_224): Release(224, "v1.1.0", rasa=False),
    ("vit_base", Weights.DINOV2_IN21K): Release(224, "v1.1.0", rasa=False),
    ("vit_base", Weights.DINOV2_IN21K_518): Release(518, "v1.1.0"),
    ("vit_large", Weights.LAION): Release(518, "v1.0.0"),
    ("vit_large", Weights.LAION_224): Release(224, "v1.1.0", rasa=False),
    ("vit_large", Weights.DINOV2_IN21K): Release(224, "v1.1.0", rasa=False),
    ("vit_large", Weights.DINOV2_IN21K_518): Release(518, "v1.1.0"),
    ("vit_large", Weights.LAION_518): Release(518, "v1.1.0"),
    ("vit_giant2", Weights.LAION): Release(224, "v1.0.0"),
}
DEFAULT_IMG_SIZE = 224  # an architecture built without published weights


def parse_weights(weights: Weights | str) -> Weights:
    """``Weights`` from a member, its name or its file-name value (case-insensitive)."""
    if isinstance(weights, Weights):
        return weights
    for option in Weights:
        if weights.lower() in (option.name.lower(), option.value.lower()):
            return option
    raise ValueError(f"unsupported weights {weights!r}; expected one of {', '.join(w.name for w in Weights)}")


def available_weights(arch_name: str) -> list[str]:
    """Names of the weights published for ``arch_name``, in table order."""
    return [weights.name for arch, weights in RELEASES if arch == arch_name]


def release(arch_name: str, weights: Weights) -> Release:
    """The table entry; a ``ValueError`` naming the weights available for ``arch_name`` otherwise."""
    try:
        return RELEASES[(arch_name, weights)]
    except KeyError:
        available = ", ".join(available_weights(arch_name)) or "none"
        raise ValueError(
            f"weights {weights.name!r} are not published for {arch_name}; available: {available}"
        ) from None


def native_img_size(arch_name: str, weights: Weights) -> int:
    """Image size the release was trained at (its ``pos_embed`` grid × patch size); 224 when not published."""
    entry = RELEASES.get((arch_name, weights))
    return entry.img_size if entry is not None else DEFAULT_IMG_SIZE


def release_name(arch_name: str, patch_size: int, weights: Weights) -> str:
    """Official file stem, e.g. ``franca_vitl14_Laion_518`` (``vit_giant2`` → ``vitg``)."""
    return f"franca_{arch_name.replace('_', '')[:4]}{patch_size}_{weights.value}"


def backbone_urls(arch_name: str, patch_size: int, weights: Weights, base_url: str = RELEASES_URL) -> list[str]:
    """Download address(es) of the backbone: one ``.pth``, or the three archive pieces of ViT-g."""
    name = release_name(arch_name, patch_size, weights)
    root = f"{base_url}/{release(arch_name, weights).tag}"
    if arch_name == "vit_giant2":
        return [f"{root}/{name}_{piece}" for piece in VITG_PIECES]
    return [f"{root}/{name}.pth"]


def rasa_url(arch_name: str, patch_size: int, weights: Weights, base_url: str = RELEASES_URL) -> str:
    """Download address of the RASA head; a ``ValueError`` when the release publishes none."""
    entry = release(arch_name, weights)
    if not entry.rasa:
        with_rasa = [name for name in available_weights(arch_name) if RELEASES[(arch_name, Weights[name])].rasa]
        raise ValueError(
            f"no RASA head is published for {arch_name} weights={weights.name!r}; heads exist for "
            f"{', '.join(with_rasa) or 'none'}, or pass RASA_local_state_dict=PATH"
        )
    return f"{base_url}/{entry.tag}/{release_name(arch_name, patch_size, weights)}_rasa.pth"
