"""One side (``ours`` or ``official``) of one ``--compare-reference`` workload, in its own process.

Started by :mod:`benchmarks.compare_reference` as ``python reference_worker.py --side S
--workload W --shared DIR --threads N [--quick]`` with ``PYTHONPATH`` pointing at either this
repository or the official checkout: both packages are called ``franca``, so every workload
imports the same module paths and gets the implementation of its side. The ``ours`` side builds
the weights and inputs and saves them in ``DIR``; the ``official`` side loads them, so both run
on identical tensors (augmentation: the same JPEG file; its crops are random on both sides).

Protocol (one JSON object per line on the original stdout; anything else printed goes to
stderr): after set-up and one untimed warm-up run the worker answers ``{"ready": …}``; each
``run`` line on stdin is answered with ``{"seconds": t}``, ``matmul`` with the fp32 matmul GFLOP/s
measured now (the ceiling next to each timed round), ``profile`` with a torch.profiler table of one
run; ``finish`` with the process's peak
memory, then it exits. A failure is answered with ``{"error": traceback}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path.pop(0)  # this folder holds modules (rasa.py, eval.py, …) that would shadow packages

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402

# Workload settings (the rows of docs/benchmarks.md); ``quick`` values second.
GLOBAL_SIZE, LOCAL_SIZE, N_LOCAL = 224, 98, 8
AUGMENT_IMAGES = (8, 2)
HEAD = {"in_dim": 384, "hidden_dim": 2048, "bottleneck_dim": 256, "rows": 64, "prototypes": (65536, 4096)}
STEP_BATCH = (4, 2)
STEP_PROTOTYPES = (16384, 1024)
TEACHER_TEMP = 0.07


def _load_shims():
    spec = importlib.util.spec_from_file_location("_franca_reference_shims", _HERE / "reference_shims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Context:
    """What a workload builder needs: its side, the shared folder, the official root, the size."""

    def __init__(self, side: str, shared: Path, quick: bool) -> None:
        self.side, self.shared, self.quick = side, shared, quick
        self.official = side == "official"
        self.root = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0])

    def pick(self, pair: tuple):
        return pair[1] if self.quick else pair[0]

    def exchange(self, name: str, make: Callable[[], dict]) -> dict:
        """``make()`` on our side (saved to the shared folder); loaded from there on the official side."""
        path = self.shared / f"{name}.pt"
        if self.official:
            return torch.load(path, weights_only=True)
        data = make()
        torch.save(data, path)
        return data

    def prepare_official(self, *, packages: tuple[str, ...] = (), xformers: str = "disabled") -> None:
        """Shims for the official code: bare packages, xFormers disabled or the SDPA stand-in, CUDA calls."""
        if not self.official:
            return
        shims = _load_shims()
        for package in packages:
            shims.bare_package(package, self.root.joinpath(*package.split(".")))
        if xformers == "disabled":
            os.environ["XFORMERS_DISABLED"] = "1"
        else:
            shims.install_xformers_stand_in()
            shims.run_cuda_calls_on_cpu()


# ---------------------------------------------------------------------------------------------- data


def _masking_generator(masking, n_side: int):
    return masking.MaskingGenerator(
        input_size=(n_side, n_side),
        max_num_patches=0.5 * n_side * n_side,
        use_block_masking=True,
        use_inverse_block=True,
        roll=True,
    )


def _augmentation(ctx: Context, with_collate: bool) -> Callable[[], object]:
    ctx.prepare_official(packages=("franca.data",))
    from PIL import Image

    from franca.data import augmentations, collate, masking

    data = (ctx.shared / "image.jpg").read_bytes()
    extra = {"uint8_crops": True} if with_collate and not ctx.official else {}
    augment = augmentations.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), N_LOCAL, GLOBAL_SIZE, LOCAL_SIZE, **extra)
    n_side = GLOBAL_SIZE // 14
    collate_fn = partial(
        collate.collate_data_and_cast,
        mask_ratio_tuple=(0.1, 0.65),
        mask_probability=0.5,
        dtype=torch.float32,
        n_tokens=n_side * n_side,
        mask_generator=_masking_generator(masking, n_side),
    )
    images = ctx.pick(AUGMENT_IMAGES)

    def step():
        samples = [(augment(Image.open(io.BytesIO(data))), None) for _ in range(images)]
        return collate_fn(samples) if with_collate else samples

    return step


# ------------------------------------------------------------------------------------------ backbone

VITS_KWARGS = {"patch_size": 14, "img_size": GLOBAL_SIZE, "init_values": 1e-5, "block_chunks": 0, "ffn_layer": "mlp"}


def _vit_small(ctx: Context, inputs: Callable[[], dict]):
    ctx.prepare_official()
    from franca.models import vision_transformer

    torch.manual_seed(0)
    model = vision_transformer.vit_small(**VITS_KWARGS).train()
    shared = ctx.exchange("vits14", lambda: {"state_dict": model.state_dict(), **inputs()})
    model.load_state_dict(shared.pop("state_dict"), strict=True)
    return model, shared


def _backbone_single(ctx: Context) -> Callable[[], None]:
    model, data = _vit_small(ctx, lambda: {"x": torch.randn(8, 3, GLOBAL_SIZE, GLOBAL_SIZE)})

    def step():
        model.zero_grad(set_to_none=True)
        model(data["x"]).square().mean().backward()

    return step


def _backbone_multicrop(ctx: Context) -> Callable[[], None]:
    """2×224 + 8×98 crops of 4 images: ours in one packed list pass; the official CPU path (no xFormers) per crop size."""
    model, data = _vit_small(
        ctx,
        lambda: {
            "global": torch.randn(2 * 4, 3, GLOBAL_SIZE, GLOBAL_SIZE),
            "local": torch.randn(N_LOCAL * 4, 3, LOCAL_SIZE, LOCAL_SIZE),
        },
    )
    crops = [data["global"], data["local"]]

    def features():
        if ctx.official:
            return [model.forward_features(c) for c in crops]
        return model.forward_features(crops, masks=[None, None])

    def step():
        model.zero_grad(set_to_none=True)
        sum(o["x_norm_clstoken"].square().mean() for o in features()).backward()

    return step


# --------------------------------------------------------------------------------------------- heads


def _mrl_head(ctx: Context) -> Callable[[], None]:
    ctx.prepare_official()
    from franca.layers import mrl_dino_head

    d = HEAD["in_dim"]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = mrl_dino_head.MRLDINOHead(
            d,
            ctx.pick(HEAD["prototypes"]),
            hidden_dim=HEAD["hidden_dim"],
            bottleneck_dim=HEAD["bottleneck_dim"],
            nesting_list=[d // 16, d // 8, d // 4, d // 2, d],
        )
    shared = ctx.exchange("mrl_head", lambda: {"state_dict": head.state_dict(), "x": torch.randn(HEAD["rows"], d)})
    head.load_state_dict(shared["state_dict"], strict=True)
    x = shared["x"]

    def step():
        head.zero_grad(set_to_none=True)
        sum(out.sum() for out in head(x)).backward()

    return step


def _sinkhorn(ctx: Context) -> Callable[[], None]:
    """``MRLDINOLoss.sinkhorn_knopp_teacher`` over the five levels of the 65 536-prototype head, 2×64 rows."""
    ctx.prepare_official()
    from franca.loss import mrl_dino_loss

    d, k = HEAD["in_dim"], ctx.pick(HEAD["prototypes"])
    per_level = [int(k * m / d) for m in (d // 16, d // 8, d // 4, d // 2, d)]
    shared = ctx.exchange("sinkhorn", lambda: {"levels": [torch.randn(2 * HEAD["rows"], n) for n in per_level]})
    levels = tuple(shared["levels"])
    loss = mrl_dino_loss.MRLDINOLoss(k)

    def step():
        loss.sinkhorn_knopp_teacher(levels, TEACHER_TEMP, n_global_crops_teacher=2)

    return step


# ---------------------------------------------------------------------------------------------- step


def step_overrides(quick: bool) -> list[str]:
    """The shared config of the training-step comparison (a ViT-S/14 Franca run, reduced prototypes)."""
    k = STEP_PROTOTYPES[1] if quick else STEP_PROTOTYPES[0]
    return [
        "compute_precision.grad_scaler=false",
        "student.arch=vit_small",
        "student.patch_size=14",
        "student.drop_path_rate=0.1",
        "student.ffn_layer=mlp",
        "student.block_chunks=0",
        "dino.MRL=true",
        f"dino.head_n_prototypes={k}",
        f"ibot.head_n_prototypes={k}",
        "ibot.separate_head=true",
        "train.centering=sinkhorn_knopp",
        f"crops.global_crops_size={GLOBAL_SIZE}",
        f"crops.local_crops_size={LOCAL_SIZE}",
        f"crops.local_crops_number={N_LOCAL}",
    ]


def _step_batch(batch: int) -> dict:
    from franca.data import collate, masking

    n_side = GLOBAL_SIZE // 14
    samples = [
        (
            {
                "global_crops": [torch.randn(3, GLOBAL_SIZE, GLOBAL_SIZE) for _ in range(2)],
                "local_crops": [torch.randn(3, LOCAL_SIZE, LOCAL_SIZE) for _ in range(N_LOCAL)],
            },
            None,
        )
        for _ in range(batch)
    ]
    out = collate.collate_data_and_cast(
        samples, (0.1, 0.65), 0.5, torch.float32, n_side * n_side, _masking_generator(masking, n_side)
    )
    out["upperbound"] = torch.tensor(out["upperbound"])
    return out


def _train_step(ctx: Context) -> Callable[[], None]:
    """``SSLMetaArch.forward_backward`` (teacher targets, student multi-crop pass, losses, backward)."""
    ctx.prepare_official(packages=("franca.data", "franca.train"), xformers="stand-in")
    from omegaconf import OmegaConf

    overrides = step_overrides(ctx.quick)
    if ctx.official:
        default = OmegaConf.load(ctx.root / "franca" / "configs" / "ssl_default_config.yaml")
        cfg = OmegaConf.merge(default, OmegaConf.from_dotlist(overrides))
    else:
        from franca.utils.config import load_config_file

        cfg = load_config_file(None, overrides)
    from franca.train.ssl_meta_arch import SSLMetaArch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SSLMetaArch(cfg)
    model.need_to_synchronize_fsdp_streams = False  # the official FSDP stream hand-over (no FSDP here)
    shared = ctx.exchange(
        "train_step",
        lambda: {
            "student": model.student.state_dict(),
            "teacher": model.teacher.state_dict(),
            "batch": _step_batch(ctx.pick(STEP_BATCH)),
        },
    )
    model.student.load_state_dict(shared["student"], strict=True)
    model.teacher.load_state_dict(shared["teacher"], strict=True)
    model.train()
    batch = dict(shared["batch"], upperbound=int(shared["batch"]["upperbound"]))

    def step():
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.forward_backward(batch, teacher_temp=TEACHER_TEMP)

    return step


BUILDERS: dict[str, Callable[[Context], Callable[[], object]]] = {
    "augment": partial(_augmentation, with_collate=False),
    "augment_collate": partial(_augmentation, with_collate=True),
    "backbone_single": _backbone_single,
    "backbone_multicrop": _backbone_multicrop,
    "mrl_head": _mrl_head,
    "sinkhorn": _sinkhorn,
    "train_step": _train_step,
}


def _peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would include the parent's from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _matmul_gflops(n: int = 2048) -> float:
    """fp32 ``n×n @ n×n`` throughput at this process's thread count (median of 3): the ceiling of a round."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[1] / 1e9


def _profile(step: Callable[[], object], rows: int = 12) -> str:
    """torch.profiler table of one run: the operators with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def _serve(step: Callable[[], object], reply: Callable[[dict], None]) -> None:
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            start = time.perf_counter()
            step()
            reply({"seconds": time.perf_counter() - start})
        elif command == "profile":
            reply({"table": _profile(step)})
        elif command == "matmul":
            reply({"gflops": _matmul_gflops()})
        elif command == "finish":
            reply({"peak_mem_mb": _peak_rss_mb()})
            return
        else:
            reply({"error": f"unknown command {command!r}"})
            return


def main() -> None:
    parser = argparse.ArgumentParser(description="one side of a --compare-reference workload")
    parser.add_argument("--side", choices=("ours", "official"), required=True)
    parser.add_argument("--workload", choices=sorted(BUILDERS), required=True)
    parser.add_argument("--shared", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from either code base go to the log, not into the protocol
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    try:
        torch.set_num_threads(args.threads)
        step = BUILDERS[args.workload](Context(args.side, args.shared, args.quick))
        step()  # warm-up
        reply({"ready": True, "threads": torch.get_num_threads(), "torch": torch.__version__})
        _serve(step, reply)
    except Exception:
        reply({"error": traceback.format_exc()})
        sys.exit(1)


if __name__ == "__main__":
    main()
