"""`cnnops report`: the fit verdict on known curves, a real run made to overfit, the page as a
browser shows it, and a project where nothing has run yet."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cnnops.cli import app
from cnnops.config import load_config
from cnnops.fit import fit_verdict
from tests.browser import screenshot
from tests.conftest import ROOT, set_params

SECTIONS = [
    "Data",
    "Training curves and fit",
    "Test set: confusion and mistakes",
    "Tuning study",
    "Champion vs challenger",
    "Cost",
    "What the network learned",
]


def curves(
    train_loss: list[float],
    val_loss: list[float],
    train_acc: list[float] | None = None,
    val_acc: list[float] | None = None,
) -> list[dict[str, float]]:
    rows = [
        {"epoch": e, "train_loss": t, "val_loss": v}
        for e, (t, v) in enumerate(zip(train_loss, val_loss, strict=True), 1)
    ]
    for name, values in (("train_acc", train_acc), ("val_acc", val_acc)):
        for row, value in zip(rows, values or [], strict=False):
            row[name] = value
    return rows


# --- the verdict on known curves ----------------------------------------------------------------


def test_high_flat_losses_and_low_training_accuracy_are_underfitting() -> None:
    rows = curves(
        [2.30, 2.29, 2.29, 2.28, 2.28, 2.27],
        [2.30, 2.30, 2.29, 2.29, 2.29, 2.28],
        [0.11, 0.12, 0.13, 0.13, 0.14, 0.15],
        [0.10, 0.12, 0.12, 0.13, 0.13, 0.14],
    )
    verdict = fit_verdict(rows)
    assert verdict.kind == "underfitting" and verdict.turn_epoch is None
    assert "0.150" in verdict.reason


def test_validation_loss_that_settles_near_training_loss_is_a_good_fit() -> None:
    rows = curves(
        [1.0, 0.5, 0.3, 0.2, 0.15, 0.12, 0.10, 0.09],
        [0.9, 0.5, 0.35, 0.28, 0.25, 0.24, 0.235, 0.233],
        [0.70, 0.85, 0.90, 0.93, 0.95, 0.96, 0.97, 0.97],
        [0.72, 0.84, 0.88, 0.90, 0.91, 0.92, 0.92, 0.92],
    )
    verdict = fit_verdict(rows)
    assert (verdict.kind, verdict.best_epoch, verdict.turn_epoch) == ("good fit", 8, None)


def test_validation_loss_turning_up_while_training_loss_falls_is_overfitting_at_the_turn() -> None:
    rows = curves(
        [1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005],
        [0.9, 0.5, 0.35, 0.3, 0.28, 0.27, 0.30, 0.35, 0.40],
        [0.70, 0.85, 0.90, 0.94, 0.97, 0.99, 1.0, 1.0, 1.0],
        [0.72, 0.84, 0.88, 0.90, 0.92, 0.93, 0.93, 0.93, 0.92],
    )
    verdict = fit_verdict(rows)
    assert (verdict.kind, verdict.turn_epoch) == ("overfitting", 6)
    assert "turned after epoch 6" in verdict.reason


def test_a_rise_of_a_few_thousandths_near_zero_loss_is_noise_not_a_turn() -> None:
    rows = curves(
        [0.5, 0.1, 0.03, 0.01, 0.008, 0.006, 0.005],
        [0.4, 0.08, 0.02, 0.009, 0.012, 0.011, 0.012],  # +30%, but 0.003 nats
        [0.9, 0.97, 0.99, 1.0, 1.0, 1.0, 1.0],
        [0.9, 0.97, 0.99, 0.99, 0.99, 0.99, 0.99],
    )
    assert fit_verdict(rows).kind == "good fit"


def test_a_turn_from_a_validation_loss_rounded_to_zero_is_still_reported() -> None:
    # The curves CSV keeps 6 decimals: a separable validation split can log a loss of 0.0.
    rows = curves(
        [0.5, 0.01, 0.001, 0.0005, 0.0001],
        [0.4, 0.0, 0.05, 0.08, 0.1],
        [0.9, 1.0, 1.0, 1.0, 1.0],
        [0.9, 1.0, 0.99, 0.99, 0.98],
    )
    verdict = fit_verdict(rows)
    assert (verdict.kind, verdict.turn_epoch) == ("overfitting", 2)
    assert "from its lowest, 0, it rose to 0.07667" in verdict.reason


def test_a_wide_accuracy_gap_is_overfitting_even_before_validation_loss_turns() -> None:
    rows = curves(
        [1.0, 0.4, 0.1, 0.02], [1.1, 0.8, 0.7, 0.65], [0.7, 0.9, 0.99, 1.0], [0.6, 0.72, 0.78, 0.8]
    )
    verdict = fit_verdict(rows)
    assert (verdict.kind, verdict.turn_epoch) == ("overfitting", None)
    assert "by 0.200" in verdict.reason


def test_without_accuracies_a_flat_training_loss_is_underfitting() -> None:
    assert fit_verdict(curves([2.3, 2.25, 2.2], [2.3, 2.28, 2.27])).kind == "underfitting"
    assert fit_verdict(curves([2.3, 1.0, 0.5], [2.3, 1.1, 0.6])).kind == "good fit"


def test_curves_without_both_losses_have_no_verdict() -> None:
    with pytest.raises(ValueError, match="no epoch"):
        fit_verdict([{"epoch": 1, "train_loss": 0.5}])


# --- a real run made to overfit -------------------------------------------------------------------

OVERFIT = [
    # 198 training images (11%), and no lever against overfitting: no dropout, batch norm,
    # weight decay or schedule, a wide head, batches of 64 (with batches of 16 the validation
    # loss flattens instead of turning). Validation loss turns after about twenty epochs.
    "prepare.val_fraction=0.3",
    "prepare.test_fraction=0.59",
    "model.dropout_conv=0",
    "model.dropout_fc=0",
    "model.batch_norm=false",
    "model.fc=[512,512]",
    "train.optimizer.weight_decay=0",
    "train.scheduler.name=none",
    "train.batch_size=64",
    "train.accelerator=cpu",
    "tune.n_trials=3",  # complete trials enough for every view of the study
    "tune.space.lr=[0.001,0.01]",
]


def report_in(folder: Path) -> dict[str, Any]:
    """`cnnops report` run in this process from `folder`, on its MLflow store; its answer."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch → prepare → train → tune → register → evaluate → promote on tiny, overfitting
    settings, then `cnnops report`, as a user runs them."""

    from cnnops import registry, reports
    from cnnops.data.prepare import load, prepare
    from cnnops.data.sources import fetch
    from cnnops.evaluate import evaluate_stage
    from cnnops.train import train_stage
    from cnnops.tune_stage import tune_stage

    folder = tmp_path_factory.mktemp("report")
    (folder / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(folder / "params.yaml", OVERFIT)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        config = load_config(folder / "params.yaml")
        fetch(config.fetch, config.paths.raw)
        prepare(config, config.paths.raw, config.paths.prepared, config.paths.reports / "data.json")
        train_stage(config)
        tune_stage(load_config(folder / "params.yaml", ["train.max_epochs=3"]))
        registry.register(config)
        evaluate_stage(config)
        registry.promote(config)
        # One picture of our own beside whatever evaluate drew there: every PNG is shown.
        x = load(config.paths.prepared).x["train"]
        reports.plot_image_grid(
            [list(x[:6])], config.paths.reports / "insight" / "zz_seen-inputs.png"
        )
    report_in(folder)
    return folder


@pytest.mark.slow
def test_a_run_made_to_overfit_is_reported_as_overfitting_at_the_epoch_it_kept(
    project: Path,
) -> None:
    markdown = (project / "reports/report.md").read_text()
    train = json.loads((project / "reports/train.json").read_text())
    assert "Verdict: overfitting." in markdown
    # Early stopping watches val_loss: the checkpoint it kept is from the turning epoch.
    assert f"turned after epoch {train['best_epoch']}:" in markdown
    assert (
        train["stopped_early"] and f"stopped the run after epoch {train['epochs_run']}" in markdown
    )
    assert "Not run yet" not in markdown
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown):  # every picture it links exists
        assert (project / "reports" / link).is_file(), link


@pytest.mark.slow
def test_the_study_cost_is_summed_and_logged_once_to_the_study_run(project: Path) -> None:
    import optuna

    from cnnops import studies

    tune = json.loads((project / "reports/tune/tune.json").read_text())
    storage = studies.open_storage(str(project / "models/optuna/studies.journal"), lambda *_: None)
    study = optuna.load_study(study_name=tune["study"], storage=storage)
    spent = sum(t.user_attrs["metrics"]["device_seconds"] for t in study.trials)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert run.data.metrics["study_device_seconds"] == pytest.approx(spent, abs=0.01)
    assert run.data.metrics["study_trials_costed"] == 3
    assert f"| study, all trials | {spent:.4g} |" in (project / "reports/report.md").read_text()
    assert report_in(project)["verdict"] == "overfitting"
    assert "already recorded there" in (project / "reports/report.md").read_text()
    history = client.get_metric_history(run.info.run_id, "study_device_seconds")
    assert len(history) == 1  # the second report logged nothing new


@pytest.mark.slow
def test_the_page_renders_every_section_and_picture_offline(project: Path, page) -> None:  # noqa: F811
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto((project / "reports/report.html").as_uri())
    titles = page.locator("section h2").all_inner_texts()
    assert titles == [f"{i}. {t}" for i, t in enumerate(SECTIONS, 1)]
    assert "overfitting" in page.locator("#fit .callout").inner_text()
    widths = page.evaluate("[...document.images].map(i => i.complete ? i.naturalWidth : 0)")
    insight = sorted(p.stem for p in (project / "reports/insight").glob("*.png"))
    # fit, confusion, misclassified, three study views, and every insight picture
    assert len(widths) == 6 + len(insight) and all(w > 0 for w in widths)
    captions = page.locator("#insight figcaption").all_inner_texts()
    assert captions == [re.sub(r"[_-]+", " ", name) for name in insight]
    assert page.locator("script").count() == 0
    assert all(url.startswith(("file:", "data:")) for url in requested)  # it works offline
    screenshot(page, "report")


# --- nothing run yet, and bad input ---------------------------------------------------------------


def test_a_project_where_nothing_ran_gets_a_note_per_section_and_no_store(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--out", "new/folder/report.html"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["not_run"] == SECTIONS
    markdown = (workdir / "new/folder/report.md").read_text()
    assert markdown.count("> Not run yet:") == len(SECTIONS)
    assert "<img" not in (workdir / "new/folder/report.html").read_text()
    assert not (workdir / "mlflow.db").exists() and not (workdir / "models").exists()


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--params", "missing.yaml"], "missing.yaml: params file not found"),
        (["--out", "reports"], "--out reports: is a folder"),
        (["--out", "reports/report.md"], "--out reports/report.md: expected an .html file"),
    ],
)
def test_bad_input_is_one_line_naming_the_culprit_and_exit_2(
    workdir: Path, args: list[str], culprit: str
) -> None:
    (workdir / "reports").mkdir()
    result = CliRunner().invoke(app, ["report", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"cnnops report: error: {culprit}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert list((workdir / "reports").iterdir()) == []


def test_a_report_before_any_study_creates_no_sqlite_study_storage(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--set", "tune.storage=sqlite:///studies.db"])
    assert result.exit_code == 0, result.output
    assert "Tuning study" in json.loads(result.stdout)["not_run"]
    assert not (workdir / "studies.db").exists()


def test_a_password_in_the_tracking_uri_never_reaches_the_report(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on: the registry is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ana:s3cret-pw@127.0.0.1:{port}")
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    markdown = (workdir / "reports/report.md").read_text()
    assert "could not be read" in markdown and "ana:***@" in markdown
    for text in (markdown, (workdir / "reports/report.html").read_text(), result.output):
        assert "s3cret-pw" not in text
