"""What DP-SGD costs per optimiser step, against plain training, for cnn and resnet18 (issue 4).

    .venv/bin/python -m bench.dp_cost [--tiny | --quick | --full] [--batch 32] [--steps N] [--out FILE]

For each model it measures, in one run, the time of one training step and how far
training raises the peak memory of a fresh process (so one mode's
allocations do not hide another's) for:

* ``plain``: Adam on the mean loss, as sites train without DP;
* ``hooks``: Opacus' per-sample gradients by module hooks (what
  ``shared.privacy.train_dp`` uses);
* ``functorch``: per-sample gradients by ``torch.func`` (``force_functorch``);
* ``ghost``: ghost clipping (``GradSampleModuleFastGradientClipping``): the
  per-sample gradient *norms* without the per-sample gradients, and a second
  backward pass with the clipping factors.

Each mode trains in the project's memory layout: plain in the model's faster one
(``shared.models.memory_format``: channels_last for cnn), the DP modes in plain
NCHW, where Opacus' per-sample convolution gradients are right
(``shared.privacy.dp_batch``).
It prints each mode's step time over plain's and its memory over plain's, and
checks each DP mode against ``hooks``: with the noise off, one step's
privatised gradient must agree to 1e-4 (a mode that is fast but wrong is
reported as such). ``ghost`` never materialises per-sample gradients, so it
cannot serve ``privacy.unit: patient`` (which sums a patient's per-sample
gradients before clipping); the output says so. Target: ``hooks`` at most 2x
plain's step time for cnn.

Sizes: tiny: cnn, plain and hooks, 2 timed steps; quick: cnn and resnet18,
plain and hooks, 5 timed steps; full: both models, all four modes, 10 timed
steps (bench/results/dp_cost.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from bench import common
from shared.config import ModelConfig
from shared.mimic import FEATURES
from shared.models import build_model, memory_format

NAME = "dp_cost"
MODES = ("plain", "hooks", "functorch", "ghost")
SIZES = {
    "tiny": {"models": ("cnn",), "modes": ("plain", "hooks"), "steps": 2},
    "quick": {"models": ("cnn", "resnet18"), "modes": ("plain", "hooks"), "steps": 5},
    "full": {"models": ("cnn", "resnet18"), "modes": MODES, "steps": 10},
}
TARGET_CNN = 2.0  # DP-SGD step time over plain's, cnn
CLIP = 1.0


def _batch(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 64, 64, generator=gen)
    ehr = torch.randn(batch, len(FEATURES), generator=gen)
    labels = torch.randint(0, 3, (batch,), generator=gen)
    return images, ehr, labels


def _stepper(model_name: str, mode: str, batch: int, noise: float, optimiser=torch.optim.Adam, lr: float = 1e-3):
    """A ``step()`` that trains the model one step in ``mode``; and the model's trainable parameters."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=model_name), len(FEATURES), 3)
    # As the project trains: plain in the model's faster layout (shared.train.fast_layout), DP-SGD in plain
    # NCHW, the only layout in which Opacus' per-sample convolution gradients are right (privacy.dp_batch).
    layout = memory_format(model) if mode == "plain" else torch.contiguous_format
    model.to(memory_format=layout)
    images, ehr, labels = _batch(batch)
    images = images.contiguous(memory_format=layout)

    def per_sample(logits, y):
        return nn.functional.cross_entropy(logits, y, reduction="none")

    if mode == "plain":
        opt = optimiser(model.parameters(), lr=lr)

        def step():
            opt.zero_grad()
            model.loss(images, ehr, labels, nn.CrossEntropyLoss()).backward()
            opt.step()
        return step, list(model.parameters())
    if mode == "ghost":
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=CLIP, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(optimiser(gsm.parameters(), lr=lr), noise_multiplier=noise,
                                              max_grad_norm=CLIP, expected_batch_size=batch, loss_reduction="mean")

        def step():
            opt.zero_grad()
            losses = gsm._module.loss(images, ehr, labels, per_sample)
            DPTensorFastGradientClipping(gsm, opt, losses, "mean").backward()
            opt.step()
        return step, list(gsm.parameters())
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    opt = DPOptimizer(optimiser(gsm.parameters(), lr=lr), noise_multiplier=noise, max_grad_norm=CLIP,
                      expected_batch_size=batch, loss_reduction="mean")

    def step():
        opt.zero_grad(set_to_none=True)
        gsm._module.loss(images, ehr, labels, lambda logits, y: per_sample(logits, y).sum()).backward()
        opt.step()
    return step, list(gsm.parameters())


def _privatised_gradient(model_name: str, mode: str, batch: int) -> torch.Tensor:
    """One step's privatised gradient with the noise off (SGD at learning rate 0 leaves it in ``.grad``)."""
    step, params = _stepper(model_name, mode, batch, 0.0, optimiser=torch.optim.SGD, lr=0.0)
    step()
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def measure_one(model_name: str, mode: str, batch: int, steps: int) -> dict:
    """In this (fresh) process: seconds a step, and how far training raised the peak resident memory."""
    step, _ = _stepper(model_name, mode, batch, 1.0)
    before_mb = _peak_mb()  # imports and the model: the same in every mode
    for _ in range(2):  # warm-up: first calls allocate and pick kernels
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    peak_mb = _peak_mb() - before_mb
    agrees = None
    if mode not in ("plain", "hooks"):
        reference = _privatised_gradient(model_name, "hooks", batch)
        agrees = bool(torch.allclose(_privatised_gradient(model_name, mode, batch), reference, atol=1e-4, rtol=1e-4))
    return {"step_s": seconds, "peak_mb": peak_mb, "agrees_with_hooks": agrees}


def run_one(model_name: str, mode: str, batch: int, steps: int) -> dict:
    """``measure_one`` in a fresh process (so one mode's allocations do not hide another's)."""
    done = subprocess.run([sys.executable, "-m", "bench.dp_cost", "--one", model_name, mode, "--batch", str(batch),
                           "--steps", str(steps)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dp_cost: {model_name} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = common.parser(NAME, __doc__, data=False)
    ap.add_argument("--batch", type=int, default=32, help="batch size (fedfuse's default train.batch_size is 32)")
    ap.add_argument("--steps", type=int, help="timed steps per mode instead of the size's (after 2 warm-up steps)")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as a site trains (train.threads)
    size = SIZES[args.size]
    steps = args.steps or size["steps"]
    if args.one:
        print(json.dumps(measure_one(*args.one, args.batch, steps)))
        return 0
    started = time.perf_counter()
    print(f"DP-SGD cost per step, batch {args.batch}, {steps} timed steps, 1 thread, each mode in its own process",
          flush=True)
    figures = {}
    for model_name in size["models"]:
        results = {mode: run_one(model_name, mode, args.batch, steps) for mode in size["modes"]}
        plain = results["plain"]
        for mode, r in results.items():
            r["x_time"] = r["step_s"] / plain["step_s"]
            r["x_memory"] = r["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else None
            check = {None: "", True: "; privatised gradient = hooks' (1e-4)",
                     False: "; privatised gradient DIFFERS from hooks'"}[r["agrees_with_hooks"]]
            note = "; no per-sample gradients: cannot serve privacy.unit patient" if mode == "ghost" else ""
            print(f"{model_name:<9} {mode:<10} {r['step_s'] * 1000:8.1f} ms/step  x{r['x_time']:5.2f} time | "
                  f"training memory {r['peak_mb']:6.0f} MB  x{common.fmt(r['x_memory'], 3):>5}{check}{note}",
                  flush=True)
        figures[model_name] = results
    cnn = figures.get("cnn", {}).get("hooks")
    targets = [common.target("DP-SGD step / plain step, cnn (Opacus hooks, what sites use)",
                             cnn["x_time"] if cnn else None, TARGET_CNN, "x")]
    targets += [common.target(f"DP-SGD step / plain step, {m} (hooks)", r["hooks"]["x_time"], None, "x")
                for m, r in figures.items() if m != "cnn" and "hooks" in r]
    settings = {"models": list(size["models"]), "modes": list(size["modes"]), "steps": steps, "batch": args.batch,
                "threads": 1, "clip": CLIP}
    common.write(args, NAME, started, settings, figures, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
