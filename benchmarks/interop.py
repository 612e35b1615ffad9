"""Interop workload: how far transformers and timm drift from our outputs at image sizes other than the exported one.

A ViT-S/14 with the release settings but LayerScale 1 (random weights, so that the blocks mix tokens as trained
ones do; the position table as initialised, std 0.02, plus a smooth random field of std 0.5 so that the resize
matters as it does for trained tables) is exported at its native 224 px to a transformers folder (``Dinov2Model``:
bicubic resize to the output size, no 0.1 offset), the same with 4 registers (``Dinov2WithRegistersModel``:
antialiased resize) and a timm file (created with ``dynamic_img_size=True``: antialiased resize), then run at other
sizes. Each row gives the relative gap ``max |theirs − ours| / max |ours|`` of the patch and class tokens, and the
gap of an export baked at that size (``--img-size``), which is rounding only. ``seconds`` is the library's forward
time for one image.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from franca.export import export_backbone
from franca.export.hf_export import HFRunner
from franca.export.timm_export import TimmRunner
from franca.export.verify import relative_error
from franca.models.vision_transformer import vit_small

NATIVE = 224
SIZES = (168, 280, 336, 518)
KWARGS = {"patch_size": 14, "img_size": NATIVE, "init_values": 1.0, "block_chunks": 0, "ffn_layer": "swiglufused"}


def _model(registers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vit_small(num_register_tokens=registers, **KWARGS).eval()
    grid = NATIVE // 14
    with torch.no_grad():
        field = torch.randn(1, model.embed_dim, 4, 4)
        smooth = torch.nn.functional.interpolate(field, size=(grid, grid), mode="bicubic", align_corners=False)
        model.pos_embed[:, 1:] += 0.5 * smooth.flatten(2).transpose(1, 2)
    return model


def _timm_dynamic(path: Path) -> TimmRunner:
    import json

    spec_path = path.with_name(path.name + ".json")
    spec = json.loads(spec_path.read_text())
    spec["kwargs"]["dynamic_img_size"] = True
    spec_path.write_text(json.dumps(spec))
    return TimmRunner(path)


def run(quick: bool = False) -> list[dict]:
    sizes = SIZES[:2] if quick else SIZES
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = []
        for registers, library in ((0, "transformers Dinov2Model"), (4, "transformers Dinov2WithRegistersModel")):
            model = _model(registers)
            export_backbone(model, tmp / f"hf{registers}", format="hf", img_size=NATIVE)
            cases.append((library, model, HFRunner(tmp / f"hf{registers}"), "hf"))
        model = _model(0)
        export_backbone(model, tmp / "timm.pth", format="timm", img_size=NATIVE)
        cases.append(("timm (dynamic_img_size)", model, _timm_dynamic(tmp / "timm.pth"), "timm"))
        for case, (library, model, runner, format) in enumerate(cases):
            for size in sizes:
                x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
                with torch.no_grad():
                    ours = model.forward_features(x)
                start = time.perf_counter()
                theirs = runner(x)
                seconds = time.perf_counter() - start
                baked_out = tmp / f"baked_{case}_{size}"
                baked_out = baked_out.with_suffix(".pth") if format == "timm" else baked_out
                baked = export_backbone(model, baked_out, format=format, img_size=size)
                patch = relative_error(theirs["patch_tokens"], ours["x_norm_patchtokens"])
                cls = relative_error(theirs["cls_token"], ours["x_norm_clstoken"])
                rows.append(
                    {
                        "workload": f"{library} at {size} px (exported at {NATIVE})",
                        "impl": f"gap patch {patch:.1e}, cls {cls:.1e}; baked {baked.max_error:.1e}",
                        "seconds": seconds,
                        "patch_gap": patch,
                        "cls_gap": cls,
                        "baked_gap": baked.max_error,
                        "size": size,
                        "library": library,
                    }
                )
    return rows
