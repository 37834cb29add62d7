"""Training speed on MNIST: `cnnops train` against a raw loop and the typical stack, in one process.

    python benchmarks/train_speed.py --mirror DIR                        # GPU: full MNIST
    python benchmarks/train_speed.py --mirror DIR --device cpu --train-size 6000 --epochs 3

Four ways to train the same network (the MNIST seed CNN), batch size and augmentation (random
translate by up to 2 px), on the same device:
  raw      a plain PyTorch loop, dataset resident on the device, augmentation batched there;
  graphed  (GPU) the raw loop's whole step -- augment, forward, backward and a capturable AdamW
           whose learning rate is a device tensor -- captured once as a CUDA graph and replayed;
  typical  torch Dataset + per-sample Albumentations in DataLoader workers + a LightningModule;
  cnnops   `cnnops.train.train()` with the same settings, MLflow logging included (on a GPU
           also as cnnops-eager, with `train.cuda_graphs: false`, and as cnnops-graphed-opt,
           with `train.cuda_graphs_optimizer: true` under a cosine schedule).
Prints steady-state images/s (epochs after the first), epoch time, training time to 99.0% and
99.4% test accuracy, peak GPU memory and the ratios of cnnops to raw, graphed and typical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from cnnops.config import Augment, Config, Transform, load_config
from cnnops.data.prepare import Prepared, split
from cnnops.data.sources import fetch
from cnnops.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SHIFT = 2 / 28  # random translate by up to 2 px on 28x28, as a fraction of the side
AUGMENT = [("affine", 1.0, {"rotate": 0.0, "translate": SHIFT, "scale": 0.0, "shear": 0.0})]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_mnist(mirror: str, train_size: int | None) -> tuple[Config, Prepared]:
    config = load_config(
        ROOT / "pipelines" / "mnist" / "params.yaml", [f"fetch.mirror={mirror}", "paths.raw=unused"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        fetch(config.fetch, Path(tmp) / "raw")
        data = split(config, Path(tmp) / "raw")
    if train_size:
        data.x["train"], data.y["train"] = (
            data.x["train"][:train_size],
            data.y["train"][:train_size],
        )
    return config, data


def test_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm) -> float:
    """Accuracy on the test set; `norm` maps uint8 pixels (or floats in [0, 255]) to the input scale."""
    model.eval()
    correct = 0
    with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
        for i in range(0, len(x), 2000):
            correct += int((model(norm(x[i : i + 2000])).argmax(1) == y[i : i + 2000]).sum())
    model.train()
    return correct / len(y)


def summarize(name: str, epoch_times: list[float], accs: list[float], n: int, device) -> dict:
    steady = epoch_times[1:] or epoch_times
    cumulative = np.cumsum(epoch_times)

    def time_to(target: float) -> float | None:
        hits = [t for t, a in zip(cumulative, accs, strict=False) if a >= target]
        return round(float(hits[0]), 2) if hits else None

    result = {
        "name": name,
        "images_per_s": round(n * len(steady) / sum(steady)),
        "epoch_s": round(float(np.mean(steady)), 3),
        "first_epoch_s": round(epoch_times[0], 3),
        "final_test_acc": accs[-1] if accs else None,
        "time_to_99.0": time_to(0.99),
        "time_to_99.4": time_to(0.994),
    }
    if device.type == "cuda":
        result["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    return result


def augment(images: torch.Tensor) -> torch.Tensor:
    """Random translate by up to SHIFT of the side per axis, bilinear, zero fill."""
    theta = torch.zeros(len(images), 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = (torch.rand(len(images), 2, device=images.device) * 2 - 1) * SHIFT * 2
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def resident(data: Prepared, device) -> tuple[torch.Tensor, ...]:
    """The train and test images and labels, on `device` as uint8 and int64."""
    return tuple(
        torch.from_numpy(getattr(data, field)[split]).to(device)
        for split in ("train", "test")
        for field in ("x", "y")
    )


def shuffled_batches(n: int, batch_size: int, device) -> Iterator[torch.Tensor]:
    """One epoch's batches of indices into `n` images, reshuffled on `device`; the partial
    last batch is dropped, as the loops' step counts assume."""
    perm = torch.randperm(n, device=device)
    for i in range(n // batch_size):
        yield perm[i * batch_size : (i + 1) * batch_size]


def raw_loop(config: Config, data: Prepared, args, device) -> dict:
    """The anchor, written plainly: resident uint8 data, index batches, batched translate."""
    torch.manual_seed(0)
    x, y, xt, yt = resident(data, device)
    mean, std = data.mean[0], data.std[0]
    model = build_model(config.model, 1, 10, 28).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.train.optimizer.lr, weight_decay=1e-4)
    steps = len(y) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, config.train.optimizer.lr, total_steps=steps * args.epochs
    )

    def norm(xb: torch.Tensor) -> torch.Tensor:
        return (xb.float() / 255 - mean) / std

    times, accs = [], []
    for _ in range(args.epochs):
        sync(device)
        start = time.perf_counter()
        for idx in shuffled_batches(len(y), args.batch_size, device):
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(norm(augment(x[idx].float()))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        sync(device)
        times.append(time.perf_counter() - start)
        accs.append(test_accuracy(model, xt, yt, norm))
    return summarize("raw", times, accs, steps * args.batch_size, device)


def graphed_loop(config: Config, data: Prepared, args, device) -> dict:
    """The ceiling of a captured step, written by hand: the raw loop's step and its update in one
    CUDA graph. Three eager warm-up steps on a side stream (they train), then the step is
    captured and each batch is an index into static buffers plus one replay. The update is
    AdamW(capturable=True, fused=True) reading its rate from a device tensor, which OneCycleLR
    refills in place after each replay (the rate only: with cycle_momentum a graph would keep
    the first beta1). NHWC convolutions, as cnnops trains on CUDA."""
    import warnings

    torch.manual_seed(0)
    x, y, xt, yt = resident(data, device)
    mean, std = data.mean[0], data.std[0]
    model = build_model(config.model, 1, 10, 28).to(device, memory_format=torch.channels_last)
    peak = config.train.optimizer.lr
    lr = torch.tensor(peak, device=device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=1e-4, capturable=True, fused=True
    )
    steps = len(y) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, peak, total_steps=steps * args.epochs, cycle_momentum=False
    )
    xb = torch.empty((args.batch_size, *x.shape[1:]), dtype=x.dtype, device=device)
    yb = torch.empty(args.batch_size, dtype=y.dtype, device=device)

    def norm(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    def step() -> None:  # what the graph holds: the whole step, update included
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16, cache_enabled=False):
            inputs = norm(augment(xb.float())).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(inputs), yb)
        loss.backward()
        opt.step()

    graph: torch.cuda.CUDAGraph | None = None
    side = torch.cuda.Stream()
    times, accs = [], []
    for epoch in range(args.epochs):
        sync(device)
        start = time.perf_counter()
        for i, idx in enumerate(shuffled_batches(len(y), args.batch_size, device)):
            torch.index_select(x, 0, idx, out=xb)
            torch.index_select(y, 0, idx, out=yb)
            if graph is not None:
                graph.replay()
            elif epoch * steps + i < 3:  # warm-up: autograd, cuDNN and the optimizer's state
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # capturable=True stepping uncaptured
                    opt.zero_grad(set_to_none=True)
                    step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                opt.zero_grad(set_to_none=True)  # the graph's backward owns the gradients
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                graph.replay()
            sched.step()  # lr.fill_(...): outside the graph, read by the next replay
        sync(device)
        times.append(time.perf_counter() - start)
        accs.append(test_accuracy(model, xt, yt, norm))
    return summarize("graphed", times, accs, steps * args.batch_size, device)


def typical_stack(config: Config, data: Prepared, args, device) -> dict:
    """What a user writes by hand: per-sample Albumentations in workers + a LightningModule."""
    import albumentations as A
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    transform = A.Compose(
        [
            A.Affine(translate_percent=(-SHIFT, SHIFT), p=1.0),
            A.Normalize(mean=data.mean, std=data.std, max_pixel_value=255.0),
        ],
        seed=0,
    )

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data.y["train"])

        def __getitem__(self, i: int):
            image = transform(image=data.x["train"][i].transpose(1, 2, 0))["image"]
            return torch.from_numpy(image.transpose(2, 0, 1).copy()), int(data.y["train"][i])

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(config.model, 1, 10, 28)

        def training_step(self, batch, _):
            xb, yb = batch
            logits = self.net(xb)
            loss = F.cross_entropy(logits, yb)
            self.log("train_loss", loss, on_epoch=True)
            self.log("train_acc", (logits.argmax(1) == yb).float().mean(), on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=config.train.optimizer.lr)

    class Clock(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            sync(device)
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            sync(device)
            self.times.append(time.perf_counter() - self.start)

    loader = torch.utils.data.DataLoader(
        Images(),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    clock = Clock()
    trainer = L.Trainer(
        max_epochs=args.typical_epochs,
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed" if args.bf16 else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(Module(), loader)
    n = len(loader) * args.batch_size
    return summarize("typical", clock.times, [], n, device)


def cnnops_eager(config: Config, data: Prepared, args, device) -> dict:
    """`cnnops train` with `train.cuda_graphs: false`: every kernel launched from Python."""
    eager = config.model_copy(
        update={"train": config.train.model_copy(update={"cuda_graphs": False})}
    )
    return cnnops_train(eager, data, args, device, name="cnnops-eager")


def cnnops_graphed_opt(config: Config, data: Prepared, args, device) -> dict:
    """`cnnops train` with `train.cuda_graphs_optimizer: true`: each step one replay, the update
    included. Under a cosine schedule: onecycle cycles Adam's momentum every step, which keeps
    the update eager."""
    train = config.train.model_copy(
        update={
            "cuda_graphs_optimizer": True,
            "scheduler": config.train.scheduler.model_copy(update={"name": "cosine"}),
        }
    )
    graphed = config.model_copy(update={"train": train})
    return cnnops_train(graphed, data, args, device, name="cnnops-graphed-opt")


def cnnops_train(config: Config, data: Prepared, args, device, name: str = "cnnops") -> dict:
    from lightning.pytorch.callbacks import Callback

    from cnnops import tracking
    from cnnops.train import train

    xt = torch.from_numpy(data.x["test"]).to(device)
    yt = torch.from_numpy(data.y["test"]).to(device)

    class Clock(Callback):
        """Training time per epoch, validation excluded; test accuracy measured off the clock."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.accs: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            sync(device)
            self.start, self.paused = time.perf_counter(), 0.0

        def on_validation_epoch_start(self, trainer, module) -> None:
            sync(device)
            self.val_start = time.perf_counter()

        def on_validation_epoch_end(self, trainer, module) -> None:
            sync(device)
            self.paused += time.perf_counter() - self.val_start

        def on_train_epoch_end(self, trainer, module) -> None:
            sync(device)
            self.times.append(time.perf_counter() - self.start - self.paused)
            self.accs.append(test_accuracy(module.net, xt, yt, module.normalize))

    class TimedTracker(tracking.MlflowTracker):
        spent = 0.0

        def log_metrics(self, metrics, step):
            start = time.perf_counter()
            super().log_metrics(metrics, step)
            TimedTracker.spent += time.perf_counter() - start

    transform, p, params = AUGMENT[0]
    augment = Augment(transforms=[Transform(name=transform, p=p, params=params)], engine="batched")
    config = config.model_copy(
        update={
            "augment": augment,
            "train": config.train.model_copy(
                update={
                    "max_epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "compile": args.compile,
                    "precision": "bf16-mixed" if args.bf16 else "32",
                    "accelerator": "gpu" if device.type == "cuda" else "cpu",
                    # cuDNN picks its algorithms as the hand-written loops' do
                    "cudnn_benchmark": not args.no_cudnn_benchmark,
                    "early_stopping": config.train.early_stopping.model_copy(
                        update={"enabled": False}
                    ),
                }
            ),
        }
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.mlflow.model_copy(
            update={
                "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                "artifact_location": f"{tmp}/artifacts",
            }
        )
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        tracker = TimedTracker(cfg, run_name="benchmark")
        result = train(config, data, Path(tmp) / "ckpt", tracker, [clock])
        start = time.perf_counter()
        tracker.close()
        TimedTracker.spent += time.perf_counter() - start
    summary = summarize(name, clock.times, clock.accs, len(data.y["train"]), device)
    summary["mlflow_share"] = round(TimedTracker.spent / result.metrics["train_seconds"], 4)
    return summary


def e2e_project(folder: Path, mirror: str, overrides: list[str]) -> list[str]:
    """The MNIST pipeline's params written into `folder`, and the `--set` arguments that run
    them there on the IDX files in `mirror`."""
    (folder / "params.yaml").write_text((ROOT / "pipelines" / "mnist" / "params.yaml").read_text())
    overrides = [
        f"fetch.mirror={Path(mirror).resolve()}",
        "paths.src=src/cnnops",  # the pipeline's params point two folders up; here it is one
        *overrides,
    ]
    return [a for o in overrides for a in ("--set", o)]


def end_to_end(mirror: str, args) -> dict[str, float]:
    """`cnnops train` as a process, start to exit (data already prepared), run twice: the first
    run also creates the MLflow store and compiles the bytecode of what it imports (as an
    installer would have); the second is what a user meets from then on."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    # Container images often turn bytecode caching off; an installed environment has it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    overrides = [f"train.max_epochs={args.e2e_epochs}", f"train.batch_size={args.batch_size}"]
    if args.bf16:
        overrides.append("train.precision=bf16-mixed")
    cmd = [sys.executable, "-m", "cnnops"]
    with tempfile.TemporaryDirectory() as tmp:
        sets = e2e_project(Path(tmp), mirror, overrides)
        for stage in ("fetch", "prepare"):
            subprocess.run([*cmd, stage, *sets], cwd=tmp, env=env, check=True, capture_output=True)
        times = {}
        for run in ("first", "second"):
            start = time.perf_counter()
            subprocess.run(
                [*cmd, "train", *sets], cwd=tmp, env=env, check=True, capture_output=True
            )
            times[f"{run}_s"] = round(time.perf_counter() - start, 2)
            report = json.loads((Path(tmp) / "reports" / "train.json").read_text())
            times[f"{run}_fit_s"] = report["train_seconds"]
        return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mirror", required=True, help="folder with the four MNIST IDX .gz files")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--typical-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument(
        "--train-size", type=int, default=None, help="use only this many training images"
    )
    parser.add_argument("--workers", type=int, default=min(15, (os.cpu_count() or 2) - 1))
    parser.add_argument("--compile", action="store_true", help="torch.compile in the cnnops run")
    parser.add_argument(
        "--only",
        nargs="*",
        default=[
            "raw",
            "graphed",
            "cnnops",
            "cnnops-eager",
            "cnnops-graphed-opt",
            "typical",
            "e2e",
            "startup",
        ],
    )
    parser.add_argument("--e2e-epochs", type=int, default=5)
    parser.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="no cuDNN autotuning, in every loop (train.cudnn_benchmark: false, its default)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else args.device
        if args.device != "auto"
        else "cpu"
    )
    args.bf16 = device.type == "cuda"
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    config, data = load_mnist(args.mirror, args.train_size)
    card = (
        torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else f"CPU x{torch.get_num_threads()}"
    )
    print(
        f"device: {card}; train images {len(data.y['train'])}, batch {args.batch_size}, "
        f"epochs {args.epochs}, torch {torch.__version__}",
        flush=True,
    )
    results = {}
    runners = {
        "raw": raw_loop,
        "graphed": graphed_loop,
        "cnnops": cnnops_train,
        "cnnops-eager": cnnops_eager,
        "cnnops-graphed-opt": cnnops_graphed_opt,
        "typical": typical_stack,
    }
    if device.type != "cuda":  # CUDA graphs are a GPU matter: the same run on a CPU
        for name in ("graphed", "cnnops-eager", "cnnops-graphed-opt"):
            if name in args.only:
                args.only.remove(name)
    for name in [n for n in runners if n in args.only]:
        results[name] = runners[name](config, data, args, device)
        print(json.dumps(results[name]), flush=True)
    if "e2e" in args.only:
        results["e2e"] = end_to_end(args.mirror, args)
        print(f"cnnops train end to end: {json.dumps(results['e2e'])}", flush=True)
    if "startup" in args.only:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnnops", "--help"], check=True, capture_output=True)
        results["help_s"] = round(time.perf_counter() - start, 3)
        print(f"cnnops --help: {results['help_s']} s")
    if "raw" in results and "cnnops" in results:
        ratio = results["cnnops"]["images_per_s"] / results["raw"]["images_per_s"]
        print(f"cnnops / raw throughput: {ratio:.2f}x")
    for name in ("cnnops", "cnnops-graphed-opt"):
        if "graphed" in results and name in results:
            ratio = results[name]["images_per_s"] / results["graphed"]["images_per_s"]
            print(f"{name} / graphed (the whole step captured by hand): {ratio:.2f}x")
    if "cnnops-eager" in results and "cnnops" in results:
        ratio = results["cnnops"]["images_per_s"] / results["cnnops-eager"]["images_per_s"]
        print(f"cnnops / cnnops-eager (CUDA graphs on / off): {ratio:.2f}x")
    if "typical" in results and "cnnops" in results:
        ratio = results["cnnops"]["images_per_s"] / results["typical"]["images_per_s"]
        print(f"cnnops / typical throughput: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": card, **results}, indent=2))


if __name__ == "__main__":
    main()
