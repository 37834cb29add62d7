"""params.yaml validation: every bad input names its key and value, and exits with status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnops.cli import app
from cnnops.config import Config, apply_override, flatten
from cnnops.config import load_config as load_params
from cnnops.errors import ConfigError
from cnnops.models import check_architecture
from tests.conftest import ROOT, cnnops


def load_config(path: Path, overrides: list[str] | None = None) -> Config:
    """params as the CLI loads them: with the architecture's checks."""
    return load_params(path, overrides, check_architecture)


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
        ("train.cuda_graphs=sometimes", "train.cuda_graphs = 'sometimes': expected true, false"),
        ("train.cuda_graphs_optimizer=2", "train.cuda_graphs_optimizer = 2: expected true, false"),
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


# --- what the runtime would find wrong, found at load ------------------------------------------


def show_config(*overrides: str) -> tuple[int, str]:
    """`cnnops show-config --set ...` run in this process: its exit status and its stderr."""
    result = CliRunner().invoke(app, ["show-config", *(a for o in overrides for a in ("--set", o))])
    return result.exit_code, result.stderr


@pytest.mark.parametrize("devices", ["0", "-1", "true", "two"])
def test_fewer_than_one_device_is_refused_at_load(devices: str) -> None:
    with pytest.raises(ConfigError, match=f"^--set train.devices={devices}: train.devices = "):
        load_config(ROOT / "params.yaml", [f"train.devices={devices}"])


def test_a_bad_value_from_the_file_names_the_file_not_set(tmp_path: Path) -> None:
    params = write(
        tmp_path / "params.yaml", "train: {devices: 0}\ntune: {space: {lr: [0.1, 0.01]}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(params, ["model.dropout_fc=0.3"])  # an unrelated --set is not to blame
    assert str(err.value).startswith(f"{params}: train.devices = 0: ")
    with pytest.raises(ConfigError) as err:
        load_config(params, ["train.devices=1"])
    assert str(err.value).startswith(f"{params}: tune.space.lr = [0.1, 0.01]: low 0.1 is above")


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("train.optimizer={lr: 0}", "train.optimizer.lr = 0"),  # a whole section set at once
        ("model.conv=[{filters: 8, kernel: 9, padding: valid}]", "model.conv[0].kernel = 9"),
    ],
)
def test_a_bad_value_from_set_is_blamed_on_that_set(override: str, culprit: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["model.dropout_fc=0.3", override])
    assert str(err.value).startswith(f"--set {override}: {culprit}")


def test_the_last_set_of_a_key_is_the_one_blamed() -> None:
    with pytest.raises(ConfigError, match=r"^--set train.devices=0: train.devices = 0: "):
        load_config(ROOT / "params.yaml", ["train.devices=2", "train.devices=0"])


def test_a_section_check_tripped_by_a_set_names_both_origins() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "params.yaml", ["prepare.val_fraction=0.75"])
    assert str(err.value).startswith(f"{ROOT / 'params.yaml'} with --set prepare.val_fraction=0.75")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_refused_by_show_config(workdir: Path) -> None:
    result = cnnops("show-config", "--set", "train.accelerator=gpu")  # as a user runs it
    assert result.returncode == 2
    assert result.stderr == (
        "cnnops show-config: error: --set train.accelerator=gpu: train.accelerator = 'gpu': "
        "this machine has no CUDA GPU; use auto or cpu\n"
    )
    with pytest.raises(ConfigError, match="train.accelerator = 'cuda': this machine has no CUDA"):
        load_config(ROOT / "params.yaml", ["train.accelerator=cuda", "train.devices=2"])
    # auto without a GPU is the CPU: several devices are CPU processes under ddp, allowed.
    assert load_config(ROOT / "params.yaml", ["train.devices=2"]).train.devices == 2


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="MPS is here")
def test_an_mps_accelerator_without_mps_is_refused() -> None:
    with pytest.raises(ConfigError, match="^--set train.accelerator=mps: .*MPS is not available"):
        load_config(ROOT / "params.yaml", ["train.accelerator=mps"])


@pytest.mark.gpu
@pytest.mark.parametrize("accelerator", ["gpu", "cuda", "auto"])
def test_more_devices_than_gpus_is_refused(accelerator: str) -> None:
    import torch

    gpus = torch.cuda.device_count()
    load_config(ROOT / "params.yaml", [f"train.accelerator={accelerator}", f"train.devices={gpus}"])
    too_many = f"train.devices={gpus + 1}"
    with pytest.raises(ConfigError, match=f"^--set {too_many}: train.devices = {gpus + 1}: more"):
        load_config(ROOT / "params.yaml", [f"train.accelerator={accelerator}", too_many])


def test_the_runtime_check_leaves_torch_unimported_for_a_cpu_config() -> None:
    code = (
        "import sys; from pathlib import Path; from cnnops import config as c\n"
        "from cnnops.models import check_architecture\n"
        "for cfg in (c.Config(), c.Config(train={'accelerator': 'cpu', 'devices': 4}),\n"
        "            c.Config(model={'name': 'inception_v3', 'weights': 'w.pth'})):\n"
        "    c.check_paths(cfg.paths, Path.cwd()); c.check_space(cfg); c.check_runtime(cfg)\n"
        "    check_architecture(cfg)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("tune.space.dropout_fc=[0.5, 0.1]", "low 0.5 is above high 0.1"),
        ("tune.space.noise_std=[0.2, 0.2]", "low equals high (0.2), an empty range"),
        ("tune.space.weight_decay=[0, 0.01]", "a log-scale range must start above 0"),
        ("tune.space.lr=[-0.001, 0.01]", "a log-scale range must start above 0"),
        ("tune.space.batch_norm=[]", "tune.space.batch_norm = []: List should have at least 1"),
        ("tune.space.batch_norm=[1, 0]", "tune.space.batch_norm[0] = 1: Input should be a valid b"),
        ("tune.space.dropout_fc=['0.1', 0.5]", "tune.space.dropout_fc[0] = '0.1': Input should"),
        ("tune.space.l1=[false, 0.1]", "tune.space.l1[0] = False: Input should be a valid number"),
        ("tune.space.dropout_fc=[0.1, 0.2, 0.3]", "Tuple should have at most 2 items"),
        ("tune.space.dropuot=[0.1, 0.2]", "unknown key 'tune.space.dropuot'"),
        ("tune.space.dropout_fc=[0.0, 1.0]", "1.0 is not a valid model.dropout_fc"),
        ("tune.space.augment_strength=[0.0, 2.0]", "2.0 is not a valid augment.strength"),
        ("tune.space.lr=[0.001, 20]", "20.0 is not a valid train.optimizer.lr (Input should be"),
    ],
)
def test_show_config_rejects_a_bad_search_space(workdir: Path, override: str, culprit: str) -> None:
    status, stderr = show_config(override)
    assert status == 2 and stderr.count("\n") == 1
    assert stderr.startswith(f"cnnops show-config: error: --set {override}: ")
    assert culprit in stderr


@pytest.mark.parametrize(
    ("model", "culprit"),
    [
        (
            "{name: resnet50, conv: [{filters: 8}]}",
            "unknown key 'model.conv' (value [{'filters': 8}]); model (name: resnet50) takes "
            "['dropout', 'freeze', 'input_size', 'name', 'unfreeze_epoch', 'weights', "
            "'weights_sha256']",
        ),
        (
            "{name: seed_cnn, dropout: 0.2}",
            "unknown key 'model.dropout' (value 0.2); model (name: seed_cnn) takes ['batch_norm', 'conv',",
        ),
        (
            "{name: vgg99}",
            "model.name = 'vgg99': unknown model; choose one of ['efficientnet_b0', 'inception_v3', 'mobilenet_v2', 'resnet18', 'resnet50', 'seed_cnn', 'vgg16']",
        ),
        (
            "{name: mobilenet_v2, freeze: backbone}",
            "model.freeze = 'backbone': needs model.weights",
        ),
        (
            "{name: mobilenet_v2, unfreeze_epoch: 2}",
            "model.unfreeze_epoch = 2: needs freeze: backbone",
        ),
        (
            "{name: mobilenet_v2, weights_sha256: abc}",
            "model.weights_sha256 = 'abc': String should match pattern",
        ),
        (
            "{name: vgg16}",
            "prepare.image_size = 8: vgg16 takes images of at least 32x32; set model.input_size",
        ),
        (
            "{name: inception_v3, input_size: 96}",
            "model.input_size = 96: inception_v3 takes images of at least 299x299",
        ),
    ],
)
def test_each_architecture_takes_only_its_own_keys(
    tmp_path: Path, model: str, culprit: str
) -> None:
    params = write(tmp_path / "params.yaml", f"model: {model}\n")
    result = cnnops("show-config", "--params", str(params), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"cnnops show-config: error: {params}: "), result.stderr
    assert culprit in result.stderr


def test_a_study_over_a_lever_the_model_lacks_is_refused_and_defaults_are_left_out(
    tmp_path: Path,
) -> None:
    from cnnops.tune import active_levers

    params = write(
        tmp_path / "params.yaml", "model: {name: mobilenet_v2}\nprepare: {image_size: 32}\n"
    )
    config = load_config(params)  # the default space holds the seed CNN's levers: left out
    assert set(active_levers(config)) == {"dropout", "weight_decay", "l1", "lr"}
    train = load_config(params, ["tune.space.noise_std=[0.0, 0.1]"])  # training is not tuning
    assert "noise_std" not in active_levers(train)
    result = cnnops(
        "tune", "--params", str(params), "--set", "tune.space.noise_std=[0.0, 0.1]", cwd=tmp_path
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (
        "--set tune.space.noise_std=[0.0, 0.1]: tune.space.noise_std = [0.0, 0.1]: model "
        "'mobilenet_v2' has no such lever (it honours ['augment_strength', 'dropout', 'l1', 'lr', "
        "'weight_decay']); set it null or remove it"
    ) in result.stderr
    assert not (tmp_path / "models").exists()
    seed = load_config(write(tmp_path / "seed.yaml", "model: {name: seed_cnn}\n"))
    assert "dropout" not in active_levers(seed) and "dropout_fc" in active_levers(seed)


def test_unfreezing_under_ddp_is_refused(tmp_path: Path) -> None:
    params = write(
        tmp_path / "params.yaml",
        "model: {name: mobilenet_v2, weights: w.pth, freeze: backbone, unfreeze_epoch: 1}\n"
        "train: {strategy: ddp, accelerator: cpu, devices: 2}\n",
    )
    with pytest.raises(ConfigError, match=r"params.yaml: model.unfreeze_epoch = 1: DDP fixes"):
        load_config(params)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://optuna:s3cr%40t@db:5432/optuna", "postgresql://optuna:***@db:5432/optuna"),
        ("http://u:p@host/x and https://v:w@h2", "http://u:***@host/x and https://v:***@h2"),
        ("postgresql://optuna@db/optuna", "postgresql://optuna@db/optuna"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ],
)
def test_urls_are_shown_with_their_password_masked(text: str, masked: str) -> None:
    from cnnops.team import mask

    assert mask(text) == masked


@pytest.mark.parametrize("key", ["tune.storage", "mlflow.tracking_uri"])
def test_a_password_in_params_is_refused_and_never_repeated(tmp_path: Path, key: str) -> None:
    params = write(tmp_path / "params.yaml", "{}\n")
    url = "postgresql://someone:hunter2-secret@db:5432/x"
    with pytest.raises(ConfigError) as refused:
        load_config(params, [f"{key}={url}"])
    message = str(refused.value)
    assert f"{key} = 'postgresql://someone:***@db:5432/x': holds a password" in message
    assert "hunter2-secret" not in message


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["train.cuda_graphs=false"], "which train.cuda_graphs = false keeps eager"),
        (["train.scheduler.name=onecycle"], "'onecycle' changes the momentum every step"),
    ],
)
def test_a_captured_optimizer_step_that_cannot_be_is_refused_at_load(
    overrides: list[str], reason: str
) -> None:
    insist = "train.cuda_graphs_optimizer=true"
    code, stderr = show_config(insist, *overrides)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert f"--set {insist}: train.cuda_graphs_optimizer = true: " in stderr and reason in stderr
    # auto takes what applies: those runs keep the optimizer step eager.
    config = load_config(ROOT / "params.yaml", ["train.cuda_graphs_optimizer=auto", *overrides])
    assert config.train.cuda_graphs_optimizer == "auto"
    assert load_config(ROOT / "params.yaml").train.cuda_graphs_optimizer is False  # opt-in


def test_cudnn_benchmark_with_deterministic_training_is_refused_at_load() -> None:
    code, stderr = show_config("train.cudnn_benchmark=true", "train.deterministic=true")
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "train.cudnn_benchmark = true" in stderr and "train.deterministic is true" in stderr
    assert load_config(ROOT / "params.yaml", ["train.cudnn_benchmark=true"]).train.cudnn_benchmark
