"""The augmentation spec: every vocabulary entry builds and keeps images intact in shape and type,
evaluation is deterministic, bad specs fail at load time naming the key, and the pipeline
serializes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnops.augment import (
    VOCABULARY,
    apply,
    build_transforms,
    load_transforms,
    resolve,
    save_transforms,
)
from cnnops.config import Augment, load_config
from cnnops.errors import ConfigError
from tests.conftest import ROOT, cnnops

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 20, 36)]


def images(shape: tuple[int, int, int], n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def spec(*transforms: dict, strength: float = 1.0) -> Augment:
    return Augment(strength=strength, transforms=list(transforms))


@pytest.mark.parametrize("name", list(VOCABULARY))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_each_vocabulary_entry_keeps_shape_and_dtype(name: str, shape: tuple) -> None:
    for strength in (0.0, 0.5, 1.0):
        compose = build_transforms(
            spec({"name": name, "p": 1.0}, strength=strength), True, shape[1:], seed=0
        )
        for x in images(shape):
            out = apply(compose, x)
            assert out.shape == shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", [n for n in VOCABULARY if VOCABULARY[n].params])
def test_strength_zero_leaves_images_unchanged(name: str) -> None:
    compose = build_transforms(spec({"name": name, "p": 1.0}, strength=0.0), True, (28, 28), 0)
    for x in images((1, 28, 28)):
        assert np.array_equal(apply(compose, x), x)


def test_full_strength_changes_images() -> None:
    compose = build_transforms(spec({"name": "affine", "p": 1.0}), True, (28, 28), 0)
    x = images((1, 28, 28))[0]
    assert not np.array_equal(apply(compose, x), x)


def test_strength_scales_magnitudes_but_not_counts() -> None:
    resolved = resolve(
        spec(
            {"name": "affine", "params": {"rotate": 20}},
            {"name": "coarse_dropout", "params": {"holes": 4, "size": 0.5}},
            strength=0.5,
        )
    )
    assert resolved[0][2] == {"rotate": 10.0, "translate": 0.05, "scale": 0.05, "shear": 0.0}
    assert resolved[1][2] == {"holes": 4.0, "size": 0.25}


def test_eval_transforms_are_deterministic_and_leave_prepared_images_alone() -> None:
    augment = spec({"name": "affine", "p": 1.0}, {"name": "gauss_noise", "p": 1.0})
    compose = build_transforms(augment, train=False, shape=(8, 8))
    for x in images((1, 8, 8)):
        assert np.array_equal(apply(compose, x), x)
        assert np.array_equal(apply(compose, x), apply(compose, x))


def test_same_seed_gives_same_draws() -> None:
    augment = spec({"name": "affine", "p": 1.0}, {"name": "coarse_dropout", "p": 1.0})
    x = images((3, 32, 32))
    a, b = (build_transforms(augment, True, (32, 32), seed=7) for _ in range(2))
    assert all(np.array_equal(apply(a, i), apply(b, i)) for i in x)


def test_serialized_pipeline_round_trips_to_an_equal_pipeline(tmp_path: Path) -> None:
    augment = spec(*({"name": name, "p": 0.7} for name in VOCABULARY), strength=0.6)
    compose = build_transforms(augment, True, (28, 28), seed=3)
    save_transforms(compose, tmp_path / "transforms.json")
    loaded = load_transforms(tmp_path / "transforms.json")
    assert loaded.to_dict() == compose.to_dict()
    loaded.set_random_seed(3)
    compose.set_random_seed(3)
    x = images((1, 28, 28), n=8)
    assert all(np.array_equal(apply(loaded, i), apply(compose, i)) for i in x)


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("[{name: affine}, {name: rotate90}]", "augment.transforms[1].name = 'rotate90': unknown"),
        (
            "[{name: hflip}, {name: affine, params: {rotate: 500}}]",
            "augment.transforms[1].params.rotate = 500.0: outside [0, 180]",
        ),
        ("[{name: affine, params: {rotation: 5}}]", "transforms[0].params.rotation: unknown"),
        ("[{name: affine, params: {rotate: left}}]", "transforms[0].params.rotate = 'left'"),
        ("[{name: hflip, p: 1.5}]", "augment.transforms[0].p = 1.5"),
        ("[{name: coarse_dropout, params: {holes: 2.5}}]", "params.holes = 2.5: must be a whole"),
        (
            "[{name: affine}, {name: gauss_noise, params: {std: 2}}]",
            "augment.transforms[1].params.std: GaussNoise rejects std_range=(0.0, 2.0)",
        ),
        ("[{nam: affine}]", "augment.transforms[0].nam"),
    ],
)
def test_bad_transform_is_a_config_error_naming_the_dotted_key(override: str, culprit: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", [f"augment.transforms={override}"])
    assert culprit in str(err.value)


def test_cli_rejects_a_bad_argument_with_exit_2(workdir: Path) -> None:
    bad = "augment.transforms=[{name: affine}, {name: affine, params: {rotate: -5}}]"
    result = cnnops("show-config", "--set", bad)
    assert result.returncode == 2
    assert "augment.transforms[1].params.rotate = -5.0" in result.stderr
    assert result.stderr.count("\n") == 1


def test_empty_spec_does_not_import_albumentations() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from cnnops.config import load_config; "
        f"load_config(__import__('pathlib').Path({str(ROOT / 'params.yaml')!r}), "
        "['augment.transforms=[]']); print('albumentations' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


AFFINE = "augment.transforms=[{name: affine, p: 0.8}, {name: coarse_dropout, p: 0.3}]"


def prepared_digits(workdir: Path) -> None:
    cnnops("fetch", check=True)
    cnnops("prepare", check=True)


def test_augment_preview_draws_a_png_grid(workdir: Path) -> None:
    prepared_digits(workdir)
    result = cnnops(
        "augment-preview",
        "--set",
        AFFINE,
        "--n",
        "3",
        "--draws",
        "4",
        "--out",
        "grid.png",
        check=True,
    )
    assert result.stdout.strip() == "grid.png"
    assert (workdir / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_train_with_augmentation_saves_and_logs_its_exact_pipeline(workdir: Path) -> None:
    from mlflow import MlflowClient

    prepared_digits(workdir)
    result = cnnops(
        "train",
        "--set",
        AFFINE,
        "--set",
        "train.max_epochs=2",
        "--set",
        "train.num_workers=2",
        check=True,
    )
    assert '"epochs_run": 2' in result.stdout
    saved = load_transforms(workdir / "models/train/transforms.json")
    config = load_config(workdir / "params.yaml", [AFFINE])
    assert saved.to_dict() == build_transforms(config.augment, True, (8, 8), seed=42).to_dict()
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("cnnops-digits").experiment_id])[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"transforms.json", "augment_preview.png"} <= logged
