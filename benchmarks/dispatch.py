"""What one training iteration dispatches: ATen operators, bytes written by element-wise operators, host syncs.

One iteration as ``train.py`` runs it after the data arrive — ``forward_backward`` (teacher targets,
student multi-crop pass, losses, backward), gradient clipping, the AdamW step and the teacher EMA — at
the shapes of ``configs/train/IN21K/vitb14.yaml`` / ``vitl14.yaml`` (batch 32, 131 072 prototypes,
2×224 + 8×98 crops), on *fake* CPU tensors (``FakeTensorMode``: shapes, dtypes and devices without
memory or arithmetic; a fake CUDA device cannot run backward on a CPU-only build). The CPU paths taken
are the GPU ones where it matters: fused AdamW, foreach clipping and EMA, one attention call per run. fp32,
no grad scaler on both sides (casts are not counted). The second of two iterations is counted (the
first creates the optimizer state).

Counted per region — ``backbone``, ``heads``, ``sinkhorn_knopp``, ``losses``, ``glue`` (the step's own
gathers, splits and sums), ``clip``, ``optimizer``, ``ema``, and ``logging`` (the loss reduction after
the EMA, outside the iteration) — forward and backward together (a backward node belongs to the region
whose forward created it):

* ``ops``: ATen operators dispatched (each one kernel launch on a GPU, or more); views and the
  device queries of the fake mode are not counted;
* ``elementwise_ops`` / ``elementwise_mb``: the operators that are not products (mm, addmm, bmm, mv,
  attention, …) and not views, and the MiB they write (outputs plus tensors mutated in place or through
  ``out=``; an allocation such as ``empty`` writes nothing): the memory-bound passes (element-wise maps,
  reductions, copies, softmax, foreach, optimizer);
* ``host_syncs``: ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``float()``), ``nonzero``,
  boolean-mask indexing — every place the host waits for the device.

Attention is one operator forward and one backward on both sides (the xFormers call of the official
code; ours: one call per run of equal-length crops, as our SDPA path does), and so is the official iBOT
loss's ``xformers.ops.cross_entropy`` (element-wise: it writes its [rows] output, and the [rows, K] student
gradient in backward). The official step runs
through the CPU shims of :mod:`benchmarks.reference_shims` in its own process (both packages are
called ``franca``): without FSDP its teacher EMA over FSDP flat parameters becomes a foreach over all
parameters (the same two operators) and FSDP1's ``clip_grad_norm_`` per-tensor norms and scalings are
``torch.nn.utils.clip_grad_norm_(..., foreach=False)``.

    python scripts/benchmark.py --count-ops [--compare-reference DIR] [--quick]
    python -m benchmarks.dispatch [--quick] [--reference DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
TEACHER_TEMP, MOMENTUM, CLIP_GRAD = 0.07, 0.994, 3.0
REGIONS = ("backbone", "heads", "sinkhorn_knopp", "losses", "glue", "clip", "optimizer", "ema", "logging")
IN_ITERATION = REGIONS[:-1]
# (label, config, batch, overrides) of the full and the --quick settings
SETTINGS = {
    False: [("vitb14_b32", "train/IN21K/vitb14", 32, []), ("vitl14_b32", "train/IN21K/vitl14", 32, [])],
    True: [
        (
            "vitb14_b2_k8192",
            "train/IN21K/vitb14",
            2,
            ["dino.head_n_prototypes=8192", "ibot.head_n_prototypes=8192"],
        )
    ],
}
COMMON_OVERRIDES = [
    "compute_precision.grad_scaler=false",
    *(
        f"compute_precision.{net}.{part}.mixed_precision.param_dtype=fp32"
        for net in ("student", "teacher")
        for part in ("backbone", "dino_head", "ibot_head")
    ),
]

_PRODUCTS = {
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "mv",
    "addmv",
    "dot",
    "matmul",
    "convolution",
    "convolution_backward",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention_backward",
}
# allocations: host work (counted as operators) that writes no memory
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}


def _is_view(func) -> bool:
    """All returns alias an input without writing it (view, reshape-as-view, split, unbind, …)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _written_bytes(func, args, kwargs, out) -> int:
    """Bytes of fresh outputs plus bytes of arguments the schema marks as written (in-place, out=).

    The fused Adam kernels' schema marks the gradients as written: they are only when a ``grad_scale``
    unscales them in place, so without one they count as read.
    """
    written = 0
    schema_args = func._schema.arguments
    fused_adam = func._schema.name in ("aten::_fused_adamw_", "aten::_fused_adam_")
    for index, argument in enumerate(schema_args):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        if fused_adam and argument.name == "grads" and kwargs.get("grad_scale") is None:
            continue
        value = args[index] if index < len(args) else kwargs.get(argument.name)
        written += _bytes(tree_flatten(value)[0])
    fresh = [r for r in func._schema.returns if r.alias_info is None]
    if fresh and func._schema.name.split("::")[-1] not in _ALLOCATIONS:
        written += _bytes(tree_flatten(out)[0])
    return written


class DispatchCounter(TorchDispatchMode):
    """Counts ATen operators, element-wise bytes and host syncs, per region (see the module docstring).

    The region is the innermost of :meth:`region` in forward; in backward, the region recorded on the
    autograd node being run (:func:`tag_graph`), else the last one seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = ["glue"]
        self.counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.names: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.suspended = 0
        self._backward_region = "glue"
        # ids of tensors that live on the host in a GPU run too (optimizer step counters): reading them is no sync
        self.host_tensors: set[int] = set()

    @contextmanager
    def region(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        try:
            yield
        finally:
            self.stack.pop()

    @contextmanager
    def suspend(self) -> Iterator[None]:
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1

    def current_region(self) -> str:
        node = torch._C._current_autograd_node()
        if node is None:
            return self.stack[-1]
        self._backward_region = node.metadata.get("region", self._backward_region)
        return self._backward_region

    def count(self, name: str, elementwise_bytes: int = 0, elementwise: bool = False) -> None:
        region = self.current_region()
        self.names[region][name] += 1
        row = self.counts[region]
        row["ops"] += 1
        if elementwise:
            row["elementwise_ops"] += 1
            row["elementwise_mb"] += elementwise_bytes / 2**20
        if name in _SYNC_OPS:
            row["host_syncs"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            if not self.suspended and id(args[0]) not in self.host_tensors:
                self.count("_local_scalar_dense")
            # a fake tensor holds no value: the host would wait for one here: False, or 1 (a valid count and step)
            return False if args[0].dtype == torch.bool else 1
        if func.namespace in ("prim", "profiler"):
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if self.suspended or _is_view(func):
            return out
        name = func._schema.name.split("::")[-1]
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            name = "nonzero"  # boolean-mask indexing waits for the mask's count
        product = name in _PRODUCTS
        self.count(name, 0 if product else _written_bytes(func, args, kwargs, out), elementwise=not product)
        return out

    def table(self) -> dict[str, dict[str, float]]:
        rows = {region: dict(self.counts.get(region, {})) for region in REGIONS}
        for row in rows.values():
            for key in ("ops", "elementwise_ops", "elementwise_mb", "host_syncs"):
                row.setdefault(key, 0)
        return rows


def tag_graph(outputs, region: str) -> None:
    """Record ``region`` on every autograd node reachable from ``outputs`` that has none yet."""
    stack = [t.grad_fn for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or "region" in node.metadata:
            continue
        node.metadata["region"] = region
        stack.extend(child for child, _ in node.next_functions)


def wrap_region(counter: DispatchCounter, obj, method: str, region: str) -> None:
    """Run ``obj.<method>`` inside ``region`` and tag the autograd graph of its outputs with it."""
    original = getattr(obj, method)

    def wrapped(*args, **kwargs):
        with counter.region(region):
            out = original(*args, **kwargs)
            tag_graph(out, region)
        return out

    setattr(obj, method, wrapped)


class _OneOp(torch.autograd.Function):
    """An opaque operator (an xFormers kernel): ``fn(*inputs)`` counted as one operator forward and one
    backward; an element-wise one also counts the bytes it writes (its output; the input gradients)."""

    @staticmethod
    def forward(ctx, counter: DispatchCounter, name: str, fn: Callable, elementwise: bool, kwargs: dict, *inputs):
        ctx.counter, ctx.name, ctx.elementwise = counter, name, elementwise
        ctx.specs = [(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else None for t in inputs]
        with counter.suspend(), torch.no_grad():
            out = fn(*inputs, **kwargs)
        counter.count(name, _bytes([out]), elementwise=elementwise)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with ctx.counter.suspend():
            grads = [
                torch.empty(spec[0], dtype=spec[1], device=spec[2]) if spec and needs else None
                for spec, needs in zip(ctx.specs, ctx.needs_input_grad[5:])
            ]
        ctx.counter.count(ctx.name + "_backward", _bytes(grads), elementwise=ctx.elementwise)
        return None, None, None, None, None, *grads


def one_op(counter: DispatchCounter, name: str, fn: Callable, elementwise: bool = False) -> Callable:
    """``fn(*inputs, **kwargs)`` as one counted operator (attention: a product; cross-entropy: element-wise)."""

    def call(*inputs, **kwargs):
        return _OneOp.apply(counter, name, fn, elementwise, kwargs, *inputs)

    return call


def _soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temp: float, bw_inplace: bool = False):
    """What ``xformers.ops.cross_entropy`` computes: ``-Σ_k t · log_softmax(s / temp)`` over the last axis."""
    return -(teacher * torch.log_softmax(student / temp, dim=-1)).sum(-1)


# ---------------------------------------------------------------------------------------------- a side


def _install_regions(counter: DispatchCounter, model) -> None:
    for net in (model.student, model.teacher):
        for method in ("forward", "forward_features"):
            wrap_region(counter, net.backbone, method, "backbone")
        for key in ("dino_head", "ibot_head"):
            if key in net:
                wrap_region(counter, net[key], "forward", "heads")
    for loss in ("dino_loss", "ibot_patch_loss"):
        wrap_region(counter, getattr(model, loss), "sinkhorn_knopp_teacher", "sinkhorn_knopp")
    for loss in ("dino_loss", "ibot_patch_loss", "koleo_loss"):
        wrap_region(counter, getattr(model, loss), "forward", "losses")


def _ours(counter: DispatchCounter, cfg, batch: dict) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """``franca.train.iteration.training_step`` as the loop calls it, its parts wrapped in their regions."""
    import franca.layers.attention as attention
    from franca.train import iteration as train_iteration
    from franca.train import train
    from franca.train.ssl_meta_arch import SSLMetaArch

    attention.F = _FunctionalWithAttention(one_op(counter, "attention", attention.F.scaled_dot_product_attention))
    model = SSLMetaArch(cfg).train()
    model.prepare_for_distributed_training()
    optimizer = train.build_optimizer(cfg, model.get_params_groups())
    train.apply_optim_scheduler(optimizer, 1e-4, 0.04, 1e-4)
    _install_regions(counter, model)
    wrap_region(counter, optimizer, "step", "optimizer")
    update_teacher = model.update_teacher

    def update_then_log(momentum: float) -> None:
        with counter.region("ema"):
            update_teacher(momentum)
        counter.stack[0] = "logging"  # what training_step does after the EMA: read the losses

    model.update_teacher = update_then_log
    clip = train_iteration.clip_gradients

    def clip_gradients(*args) -> None:
        with counter.region("clip"):
            clip(*args)

    def iteration() -> None:
        counter.stack[0] = "glue"
        train_iteration.clip_gradients = clip_gradients
        try:
            train_iteration.training_step(
                model, optimizer, batch, iteration=1, teacher_temp=TEACHER_TEMP, momentum=MOMENTUM, clip_grad=CLIP_GRAD
            )
        finally:
            train_iteration.clip_gradients = clip

    return optimizer, iteration


class _FunctionalWithAttention:
    """``torch.nn.functional`` with ``scaled_dot_product_attention`` replaced (for one module's ``F``)."""

    def __init__(self, attention: Callable) -> None:
        self.scaled_dot_product_attention = attention

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)


def _prepare_official(counter: DispatchCounter, root: Path) -> None:
    """The CPU shims of the official code, with its xFormers attention counted as one operator."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_franca_reference_shims", HERE / "reference_shims.py")
    shims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shims)
    for package in ("franca.data", "franca.train"):
        shims.bare_package(package, root.joinpath(*package.split(".")))
    shims.install_xformers_stand_in()
    shims.run_cuda_calls_on_cpu()
    xops = sys.modules["xformers.ops"]
    xops.memory_efficient_attention = one_op(counter, "attention", xops.memory_efficient_attention)
    # the official iBOT loss takes xFormers' fused soft cross-entropy when xFormers is installed (GPU runs)
    xops.cross_entropy = one_op(counter, "cross_entropy", _soft_cross_entropy, elementwise=True)


def _official(counter: DispatchCounter, cfg, batch: dict) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    import warnings

    from franca.train.ssl_meta_arch import SSLMetaArch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SSLMetaArch(cfg)
    model.need_to_synchronize_fsdp_streams = False
    model.train()
    groups = model.get_params_groups()
    optimizer = torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    for group in optimizer.param_groups:  # the official apply_optim_scheduler
        group["weight_decay"] = 0.04 * group["wd_multiplier"]
        group["lr"] = 1e-4 * group["lr_multiplier"]
    _install_regions(counter, model)
    student = [p for p in model.student.parameters()]
    teacher = [p for p in model.teacher.parameters()]

    def iteration() -> None:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses = model.forward_backward(batch, teacher_temp=TEACHER_TEMP)
        with counter.region("glue"):  # official train.py: reduce the losses and test for NaN before the step
            reduced = {k: v.item() for k, v in losses.items()}
            if any(v != v for v in reduced.values()):
                raise FloatingPointError("NaN loss")
        with counter.region("clip"):
            for part in model.student.values():
                torch.nn.utils.clip_grad_norm_(part.parameters(), CLIP_GRAD, foreach=False)
        with counter.region("optimizer"):
            optimizer.step()
        with counter.region("ema"), torch.no_grad():
            torch._foreach_mul_(teacher, MOMENTUM)
            torch._foreach_add_(teacher, student, alpha=1 - MOMENTUM)

    return optimizer, iteration


@contextmanager
def _real_linspace() -> Iterator[None]:
    """``torch.linspace`` computed for real while a model is built (its drop-path rates are read as floats)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    fake_linspace = torch.linspace

    def linspace(*args, **kwargs):
        with unset_fake_temporarily():
            return fake_linspace(*args, **{**kwargs, "device": "cpu"})

    torch.linspace = linspace
    try:
        yield
    finally:
        torch.linspace = fake_linspace


@contextmanager
def _ours_restored() -> Iterator[None]:
    """Undo what counting our side patches or caches: the attention call of ``franca.layers.attention`` and the
    Sinkhorn-Knopp level indicator (a fake tensor must not outlive its fake mode)."""
    import importlib

    import franca.layers.attention as attention

    level_indicator = importlib.import_module("franca.loss.sinkhorn_knopp")._level_indicator
    functional = attention.F
    level_indicator.cache_clear()
    try:
        yield
    finally:
        attention.F = functional
        level_indicator.cache_clear()


def _count_iteration(side: str, counter: DispatchCounter, cfg, batch: dict) -> None:
    """Build ``side``'s model on fake tensors, run one iteration uncounted, then count the second."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        with _real_linspace(), counter.suspend(), counter:
            optimizer, iteration = (_official if side == "official" else _ours)(counter, cfg, batch)
        with counter.suspend(), counter:
            iteration()  # optimizer state, caches
        counter.host_tensors = {  # non-fused, non-capturable AdamW keeps its step counters on the host
            id(optimizer.state[p]["step"])
            for group in optimizer.param_groups
            if not (group.get("fused") or group.get("capturable"))
            for p in group["params"]
            if "step" in optimizer.state[p]
        }
        counter.counts.clear()
        counter.names.clear()
        with counter:
            iteration()


def count_side(
    side: str, config: str, batch_size: int, overrides: list[str], root: Path | None = None, batch: dict | None = None
) -> dict:
    """Counts of one iteration of ``side`` (``ours`` / ``official``), in this process (see the module docstring).

    ``batch``: the collated batch (default: ``franca.data.synthetic.random_collated_batch`` of our side).
    """
    from omegaconf import OmegaConf

    overrides = COMMON_OVERRIDES + list(overrides)
    if side == "official":
        config_path = REPO_ROOT / "configs" / f"{config}.yaml"
        default = OmegaConf.load(root / "franca" / "configs" / "ssl_default_config.yaml")
        cfg = OmegaConf.merge(default, OmegaConf.load(config_path), OmegaConf.from_dotlist(overrides))
    else:
        from franca.utils.config import load_config_file

        cfg = load_config_file(config, overrides)
    counter = DispatchCounter()
    if side == "official":
        _prepare_official(counter, root)
    if batch is None:
        from franca.data.synthetic import random_collated_batch

        batch = random_collated_batch(cfg, batch_size=batch_size)
    with _ours_restored() if side == "ours" else nullcontext():
        _count_iteration(side, counter, cfg, batch)
    rows = counter.table()
    total = {
        key: sum(rows[r][key] for r in IN_ITERATION)
        for key in ("ops", "elementwise_ops", "elementwise_mb", "host_syncs")
    }
    outside_backbone = sum(rows[r]["elementwise_mb"] for r in IN_ITERATION if r != "backbone")
    top = {region: sorted(names.items(), key=lambda kv: -kv[1])[:12] for region, names in counter.names.items()}
    return {
        "side": side,
        "regions": rows,
        "total": total,
        "elementwise_mb_outside_backbone": outside_backbone,
        "top_ops": top,
    }


def _official_in_subprocess(reference: Path, setting: tuple, batch: dict) -> dict:
    """The official side's counts, in a process that imports the official ``franca``, on the same ``batch``."""
    label, config, batch_size, overrides = setting
    env = dict(os.environ, PYTHONPATH=str(reference), CUDA_VISIBLE_DEVICES="")
    with tempfile.TemporaryDirectory(prefix="franca_dispatch_") as tmp:
        batch_file = Path(tmp) / "batch.pt"
        torch.save(batch, batch_file)
        command = [sys.executable, str(Path(__file__).resolve()), "--side", "official", "--reference", str(reference)]
        command += ["--config", config, "--batch", str(batch_size), "--overrides", json.dumps(overrides)]
        command += ["--batch-file", str(batch_file)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=str(reference))
    if result.returncode != 0:
        raise RuntimeError(f"official count failed ({label}):\n" + "\n".join(result.stderr.splitlines()[-15:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def rows_for(setting: tuple, reference: Path | None) -> list[dict]:
    """One row per region and a total row, ours and (with ``reference``) official side by side."""
    label, config, batch_size, overrides = setting
    from franca.data.synthetic import random_collated_batch
    from franca.utils.config import load_config_file

    batch = random_collated_batch(load_config_file(config, COMMON_OVERRIDES + list(overrides)), batch_size=batch_size)
    ours = count_side("ours", config, batch_size, overrides, batch=batch)
    official = _official_in_subprocess(reference, setting, batch) if reference else None
    rows = []
    for region in (*REGIONS, "total"):
        mine = ours["total"] if region == "total" else ours["regions"][region]
        row = {"workload": f"dispatch_{label}", "region": region, **{k: mine[k] for k in sorted(mine)}}
        if official is not None:
            theirs = official["total"] if region == "total" else official["regions"][region]
            row.update({f"official_{k}": theirs[k] for k in sorted(theirs)})
        rows.append(row)
    summary = {
        "workload": f"dispatch_{label}",
        "region": "elementwise outside backbone",
        "elementwise_mb": ours["elementwise_mb_outside_backbone"],
    }
    if official is not None:
        summary["official_elementwise_mb"] = official["elementwise_mb_outside_backbone"]
    rows.append(summary)
    return rows


def run(quick: bool = False, reference: str | os.PathLike | None = None) -> list[dict]:
    """Rows of every setting (``quick``: ViT-B/14 at batch 2 with 8 192 prototypes)."""
    ref = Path(reference) if reference else None
    return [row for setting in SETTINGS[quick] for row in rows_for(setting, ref)]


def _ratio(ours: float, official: float | None) -> str:
    return "–" if not official else f"{ours / official:.2f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`run`'s rows: ours, official and ours / official per region."""
    lines = [
        "| setting | region | ops | official ops | ratio | elem. MiB | official MiB | ratio | syncs | official syncs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        official_ops, official_mb = row.get("official_ops"), row.get("official_elementwise_mb")
        ops = row.get("ops")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["workload"].removeprefix("dispatch_"),
                    row["region"],
                    "" if ops is None else f"{ops:.0f}",
                    "–" if official_ops is None else f"{official_ops:.0f}",
                    "" if ops is None else _ratio(ops, official_ops),
                    f"{row['elementwise_mb']:,.0f}",
                    "–" if official_mb is None else f"{official_mb:,.0f}",
                    _ratio(row["elementwise_mb"], official_mb),
                    "" if ops is None else f"{row['host_syncs']:.0f}",
                    "–" if row.get("official_host_syncs") is None else f"{row['official_host_syncs']:.0f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reference", help="checkout of the official valeoai/Franca code")
    parser.add_argument("--side", choices=("ours", "official"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        root = Path(args.reference) if args.reference else None
        batch = torch.load(args.batch_file, weights_only=True) if args.batch_file else None
        print(json.dumps(count_side(args.side, args.config, args.batch, json.loads(args.overrides), root, batch)))
        return
    print(format_table(run(quick=args.quick, reference=args.reference)))


if __name__ == "__main__":
    if Path(sys.path[0] or ".").resolve() == HERE:
        sys.path.pop(0)
    _main()
