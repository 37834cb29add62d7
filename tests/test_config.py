"""params.yaml validation: every bad input names its key and value, and exits with status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnops.config import Config, apply_override, flatten, load_config
from cnnops.errors import ConfigError
from tests.conftest import ROOT, cnnops


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_params_files_are_valid() -> None:
    for params in [ROOT / "params.yaml", *sorted((ROOT / "pipelines").glob("*/params.yaml"))]:
        assert isinstance(load_config(params), Config)


def test_yaml_reads_exponents_as_floats_like_dvc(tmp_path: Path) -> None:
    params = write(tmp_path / "p.yaml", "train:\n  optimizer: {lr: 1e-3}\n")
    assert load_config(params).train.optimizer.lr == pytest.approx(0.001)


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("model.dropoutfc=0.3", "model.dropoutfc"),
        ("model.dropout_fc=1.5", "model.dropout_fc = 1.5"),
        ("train.max_epochs=many", "train.max_epochs = 'many'"),
        ("train.batch_size=0", "train.batch_size = 0"),
        ("model.pooling.kind=median", "model.pooling.kind = 'median'"),
        ("fetch.source=imagenet", "fetch.source = 'imagenet'"),
        ("model.conv=[{filters: 8, kernel: 9, padding: valid}]", "model.conv[0].kernel = 9"),
        ("model.conv[0].filters=0", "model.conv[0].filters = 0"),
        ("model.conv.1.padding=full", "model.conv[1].padding = 'full'"),
        ("model.name=vgg99", "model.name = 'vgg99'"),
        ("prepare.val_fraction=0.75", "val_fraction + test_fraction = 0.95"),
    ],
)
def test_bad_value_names_its_key(tmp_path: Path, override: str, culprit: str) -> None:
    params = write(tmp_path / "params.yaml", (ROOT / "params.yaml").read_text())
    with pytest.raises(ConfigError) as err:
        load_config(params, [override])
    assert culprit in str(err.value)


def test_kernel_too_large_for_later_feature_map_names_that_block() -> None:
    # digits are 8x8: 5x5 valid → 4x4, pool → 2x2, so a second 5x5 valid conv cannot fit.
    blocks = "[{filters: 8, kernel: 5, padding: valid}, {filters: 8, kernel: 5, padding: valid}]"
    with pytest.raises(ConfigError, match=r"model.conv\[1\].kernel = 5: larger than the 2x2"):
        load_config(ROOT / "params.yaml", [f"model.conv={blocks}"])


def test_overrides_nest_and_parse_yaml_values() -> None:
    data: dict = {"model": {"fc": [1]}}
    apply_override(data, "model.fc=[64, 32]")
    apply_override(data, "train.optimizer.lr=2e-4")
    apply_override(data, "model.fc[1]=16")
    assert data == {"model": {"fc": [64, 16]}, "train": {"optimizer": {"lr": 2e-4}}}


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(Config())
    assert flat["model.conv.0.filters"] == 32
    assert flat["train.optimizer.lr"] == pytest.approx(1e-3)


def test_cli_rejects_unknown_key_with_exit_2_and_writes_nothing(workdir: Path) -> None:
    result = cnnops("fetch", "--set", "fetch.sorce=mnist")
    assert result.returncode == 2
    assert "unknown key 'fetch.sorce'" in result.stderr
    assert result.stderr.count("\n") == 1  # one message, no traceback
    assert not (workdir / "data").exists()


def test_cli_rejects_wrong_type_in_params_file(workdir: Path) -> None:
    text = (workdir / "params.yaml").read_text().replace("max_epochs: 40", "max_epochs: forty")
    (workdir / "params.yaml").write_text(text)
    result = cnnops("show-config")
    assert result.returncode == 2
    assert "train.max_epochs = 'forty'" in result.stderr


def test_show_config_prints_resolved_values_with_overrides(workdir: Path) -> None:
    result = cnnops("show-config", "--set", "model.dropout_fc=0.45", check=True)
    assert "dropout_fc: 0.45" in result.stdout
    assert "noise_std: 0.0" in result.stdout  # defaults are shown too


def test_missing_data_directory_is_a_clear_error(workdir: Path) -> None:
    result = cnnops("prepare")
    assert result.returncode == 2
    assert "data/raw" in result.stderr and "cnnops fetch" in result.stderr
    assert not (workdir / "data" / "prepared").exists()
