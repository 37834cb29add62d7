"""On a real GPU: the fast path (resident data, batched augmentation) against the Albumentations path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnops.config import load_config
from cnnops.data import prepare
from cnnops.data.sources import fetch
from cnnops.evaluate import checkpoint_predictor, score
from cnnops.train import train
from tests.conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
TRANSLATE = (
    "augment.transforms=[{name: affine, p: 1.0, params: {rotate: 0, scale: 0, translate: 0.08}}]"
)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory, mnist_mirror: Path) -> prepare.Prepared:
    config = load_config(ROOT / "pipelines/mnist/params.yaml", [f"fetch.mirror={mnist_mirror}"])
    raw = tmp_path_factory.mktemp("raw")
    fetch(config.fetch, raw)
    return prepare.split(config, raw)


def accuracy(config, data: prepare.Prepared, out: Path) -> float:
    result = train(config, data, out)
    predict = checkpoint_predictor(result.best_checkpoint)
    return score(predict, data.x["test"], data.y["test"], data.classes)["test_acc"]


def test_fast_path_and_albumentations_path_reach_the_same_accuracy(mnist, tmp_path: Path) -> None:
    common = [
        "train.max_epochs=5",
        "train.batch_size=512",
        "train.precision=bf16-mixed",
        "train.early_stopping.enabled=false",
        TRANSLATE,
    ]
    params = ROOT / "pipelines/mnist/params.yaml"
    fast = load_config(params, [*common, "augment.engine=batched"])
    workers = load_config(params, [*common, "augment.engine=albumentations", "train.num_workers=8"])
    fast_acc = accuracy(fast, mnist, tmp_path / "fast")
    workers_acc = accuracy(workers, mnist, tmp_path / "workers")
    print(f"fast path {fast_acc:.4f}, albumentations path {workers_acc:.4f}")
    assert fast_acc >= 0.99 and workers_acc >= 0.99
    assert abs(fast_acc - workers_acc) <= 0.002


def test_the_fast_path_keeps_the_data_on_the_gpu(mnist, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import Callback

    seen = {}

    class Spy(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            seen["device"], seen["dtype"] = batch[0].device.type, batch[0].dtype
            seen["augment"] = module.gpu_augment is not None

    config = load_config(ROOT / "pipelines/mnist/params.yaml", ["train.max_epochs=1", TRANSLATE])
    train(config, mnist, tmp_path, callbacks=[Spy()])
    assert seen == {"device": "cuda", "dtype": torch.float32, "augment": True}
