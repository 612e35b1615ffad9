"""Released weights that the official release notes withdraw or mark incomplete, and what the hub does about them.

Source: valeoai/Franca ``release_checkpoints.md`` ("Provenance limits"). A withdrawn or incomplete combination of
architecture and weights is never downloaded: asking the hub to fetch it (the backbone or its RASA head) is an error
naming the reason and the alternatives. A local file for it (``local_state_dict`` / ``RASA_local_state_dict``) still
loads, with a warning that repeats the release note, since its content is then the caller's choice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from enum import Enum

SOURCE = "valeoai/Franca release_checkpoints.md"


@dataclass(frozen=True)
class ReleaseCaveat:
    """Why a released combination is not offered (``status``: withdrawn | incomplete) and what to use instead."""

    status: str
    reason: str
    instead: str


# Keyed by (builder name, weights name); the weights names are those of ``franca.hub.releases.Weights``. These
# combinations are absent from ``franca.hub.releases.RELEASES``.
RELEASE_CAVEATS: dict[tuple[str, str], ReleaseCaveat] = {
    ("vit_large", "IN21K"): ReleaseCaveat(
        status="withdrawn",
        reason="the v1.0.0 file franca_vitl14_In21K.pth is identical to DINOv2-L, so it is not published as Franca-L",
        instead="weights='LAION' for Franca-L/14, weights='DINOV2_IN21K' for the DINOv2-L/14 baseline",
    ),
    ("vit_giant2", "IN21K"): ReleaseCaveat(
        status="incomplete",
        reason="the v1.0.0 franca_vitg14_In21K release is incomplete and no valid source of it exists",
        instead="weights='LAION' for Franca-g/14",
    ),
}


def _describe(arch_name: str, weights: Enum, caveat: ReleaseCaveat) -> str:
    return f"{arch_name} weights={weights.name!r} are {caveat.status} ({SOURCE}): {caveat.reason}"


def check_release_weights(arch_name: str, weights: Enum, *, downloads: bool, loads_local: bool) -> None:
    """Stop before downloading a withdrawn or incomplete release; warn when a local file for it is loaded instead.

    ``downloads``: the hub is about to fetch the backbone or the RASA head of (``arch_name``, ``weights``) from the
    release; ``loads_local``: it loads a caller's file for that combination.
    """
    caveat = RELEASE_CAVEATS.get((arch_name, weights.name))
    if caveat is None:
        return
    if downloads:
        raise ValueError(
            f"{_describe(arch_name, weights, caveat)}; use {caveat.instead}, or pass local_state_dict=PATH "
            "(and RASA_local_state_dict=PATH with use_rasa_head) to load a file of your own"
        )
    if loads_local:
        warnings.warn(f"{_describe(arch_name, weights, caveat)}; loading the local file as given", stacklevel=4)
