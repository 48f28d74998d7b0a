"""Compute: training samples per second for cnn, resnet18 and fusion, the project's defaults against other settings.

    .venv/bin/python -m bench.compute [--tiny | --quick | --full] [--out FILE]

A training step is the project's: the batch assembled by the training loop's
own loader (``shared.train.make_batch``: uint8 to float and the quickstart's
augmentations), the model's loss (with fusion's auxiliary image loss), backward, Adam.
Each setting changes one thing from the defaults (configs/quickstart.yaml's
train section: batch 32, ``train.threads`` 1, and the layout
``shared.models.memory_format`` picks: channels_last for cnn and fusion's CNN,
plain NCHW (``contiguous``) for resnet18, as ``shared.train`` copies them):

* ``threads 2``: ``torch.set_num_threads(2)``, which needs the second core
  idle: with other work on it (a second simulated site, a neighbour's job:
  see the load average in the result's ``machine``) a step can take many times
  longer;
* ``as loaded``: the images as the loader makes them (the default before
  issue 8 for every model);
* ``contiguous``: each batch copied to plain NCHW (the loader's images are
  NHWC memory seen through a permute, and a rotation changes their strides
  from batch to batch);
* ``channels_last``: model and batch in ``torch.channels_last``;
* ``torch.compile``: the model's loss compiled (inputs contiguous, so the
  rotations' strides do not recompile it); the first step's seconds, the
  compilation, are reported apart and left out;
* ``batch 64``, ``batch 128``;
* ``best``: the settings that beat the default, together.

Samples per second are over timed steps after two warm-up steps, on random
64 px patches (what is timed does not depend on their content). The best
setting is reported, not applied: choosing the defaults is the project's.

Sizes: tiny: cnn, 2 timed steps, no compile; quick: the three models, 10 timed
steps, compile for cnn only (it takes about 35 s a model on 2 cores); full: 20
timed steps, compile for all three.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch
from torch import nn

from bench import common
from shared.config import ModelConfig, TrainConfig, load
from shared.data import Samples
from shared.mimic import FEATURES
from shared.models import build_model, memory_format
from shared.train import make_batch

NAME = "compute"
SIZES = {
    "tiny": {"models": ("cnn",), "steps": 2, "compile": ()},
    "quick": {"models": ("cnn", "resnet18", "fusion"), "steps": 10, "compile": ("cnn",)},
    "full": {"models": ("cnn", "resnet18", "fusion"), "steps": 20, "compile": ("cnn", "resnet18", "fusion")},
}
CHANGES = ({"threads": 2}, {"layout": "as loaded"}, {"layout": "contiguous"}, {"layout": "channels_last"},
           {"compile": True}, {"batch": 64}, {"batch": 128})
WARMUP = 2
PATCH = 64
CLASSES = 3


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to train: torch threads, batch size, the images' memory layout, the loss compiled or not."""

    threads: int = 1
    batch: int = 32
    layout: str = "as loaded"  # as loaded | contiguous | channels_last
    compile: bool = False

    def name(self, default: Setting) -> str:
        changed = [f"threads {self.threads}" if self.threads != default.threads else "",
                   self.layout if self.layout != default.layout else "",
                   "torch.compile" if self.compile else "",
                   f"batch {self.batch}" if self.batch != default.batch else ""]
        return ", ".join(c for c in changed if c) or "default"


def _samples(n: int, seed: int = 0) -> Samples:
    rng = np.random.default_rng(seed)
    return Samples(rng.integers(0, 256, (n, PATCH, PATCH, 3), dtype=np.uint8),
                   rng.normal(size=(n, len(FEATURES))).astype(np.float32),
                   rng.integers(0, CLASSES, n).astype(np.int64), np.array([f"case-{i % 8}" for i in range(n)]))


def measure(model_name: str, setting: Setting, steps: int, samples: Samples, train: TrainConfig) -> dict:
    """Training samples per second of one setting (and the compilation's seconds, if compiled).

    ``train``: the quickstart's train section, whose augmentations the loader applies.
    """
    torch.set_num_threads(setting.threads)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=model_name), len(FEATURES), CLASSES).train()
    memory = torch.channels_last if setting.layout == "channels_last" else torch.contiguous_format
    if setting.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    loss = torch.compile(model.loss) if setting.compile else model.loss
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def step() -> None:
        images, ehr, labels = make_batch(samples, rng.choice(len(samples), setting.batch, replace=False), train, gen)
        if setting.layout != "as loaded" or setting.compile:
            images = images.contiguous(memory_format=memory)
        opt.zero_grad()
        loss(images, ehr, labels, loss_fn).backward()
        opt.step()

    started = time.perf_counter()
    step()
    first = time.perf_counter() - started
    for _ in range(WARMUP - 1):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - started
    return {"samples_per_s": steps * setting.batch / seconds, "step_s": seconds / steps,
            "compile_s": first if setting.compile else None}


def best_of(default: Setting, results: dict[Setting, dict]) -> Setting:
    """The default with every single change that beat it."""
    base = results[default]["samples_per_s"]
    better = [s for s, r in results.items() if r["samples_per_s"] > base]
    fastest = {field: max((s for s in better if getattr(s, field) != getattr(default, field)),
                          key=lambda s: results[s]["samples_per_s"], default=default)
               for field in ("threads", "batch", "layout", "compile")}
    return Setting(**{field: getattr(s, field) for field, s in fastest.items()})


def main(argv: list[str] | None = None) -> int:
    args = common.parser(NAME, __doc__, data=False).parse_args(argv)
    started = time.perf_counter()
    size = SIZES[args.size]
    train = load(common.QUICKSTART).train
    default = Setting(threads=train.threads, batch=train.batch_size)
    samples = _samples(4 * 128)
    print(f"compute: samples per second in training, {size['steps']} timed steps after {WARMUP} warm-up; default: "
          f"batch {default.batch}, {default.threads} thread, the project's image layout for the model", flush=True)
    figures, rows = {}, []
    for model_name in size["models"]:
        # The project's own layout for this model (shared.models.memory_format): channels_last for the CNN.
        project = memory_format(build_model(ModelConfig(name=model_name), len(FEATURES), CLASSES))
        default = dataclasses.replace(default, layout="channels_last" if project == torch.channels_last
                                      else "contiguous")
        settings = [default] + [dataclasses.replace(default, **change) for change in CHANGES
                                if model_name in size["compile"] or not change.get("compile")]
        results = {s: measure(model_name, s, size["steps"], samples, train) for s in dict.fromkeys(settings)}
        best = best_of(default, results)
        if best not in results:
            results[best] = measure(model_name, best, size["steps"], samples, train)
        top = max(results, key=lambda s: results[s]["samples_per_s"])
        base = results[default]["samples_per_s"]
        for s, r in results.items():
            rows.append([model_name, s.name(default), r["samples_per_s"], r["samples_per_s"] / base, r["step_s"],
                         r["compile_s"], "<- best" if s == top else ""])
        figures[model_name] = {"settings": [{"name": s.name(default), **dataclasses.asdict(s), **r}
                                            for s, r in results.items()],
                               "best": {"name": top.name(default), **dataclasses.asdict(top), **results[top],
                                        "x_default": results[top]["samples_per_s"] / base}}
        print(f"  {model_name}: best {top.name(default)}, {results[top]['samples_per_s']:.0f} samples/s "
              f"(x{results[top]['samples_per_s'] / base:.2f} the default)", flush=True)
    print(common.table(["model", "setting", "samples/s", "x default", "s/step", "compile s", ""], rows))
    settings = {**{k: list(v) if isinstance(v, tuple) else v for k, v in size.items()}, "warmup": WARMUP,
                "patch": PATCH, "default": dataclasses.asdict(default)}
    headlines = [common.target(f"{m}: best ({f['best']['name']}) over the default", f["best"]["x_default"], None, "x")
                 for m, f in figures.items()]
    common.write(args, NAME, started, settings, figures, headlines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
