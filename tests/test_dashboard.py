"""MLflow and optuna-dashboard as the places people compare runs, checked in a real browser.

One tiny pipeline (train, a four-trial study, register, evaluate, promote) logs into an
`mlflow server` on loopback; each test then opens a page as a person would and checks what it
shows. Screenshots go to test-artifacts/screenshots/. MLflow's UI is a React app: every wait is
for something on the page, never a fixed time.
"""

# ruff: noqa: F811  # `browser` and `page` are fixtures imported from tests.browser, as parameters

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from cnnops import registry, tracking
from cnnops.config import Config, load_config
from tests.browser import screenshot
from tests.conftest import BIN, ROOT, cnnops
from tests.mlflow_server import free_port, mlflow_server, running
from tests.test_registry import prepared
from tests.test_tune_e2e import TINY

pytestmark = pytest.mark.slow

EPOCHS, TRIALS = 3, 4
SLOW_PAGE = 30_000  # ms: a first page load builds MLflow's whole app on two busy cores
# Every finite animation (an overlay fading in) done; spinners elsewhere run forever.
FADED_IN = """() => document.getAnimations().every(
    a => a.effect.getTiming().iterations === Infinity || a.playState !== "running")"""


@dataclass(frozen=True)
class Pipeline:
    url: str  # the MLflow server's
    folder: Path
    config: Config
    experiment_id: str
    runs: dict[str, Any]  # by run name: train, tune <study>, trial-0..3, evaluate, export-onnx

    @property
    def study(self) -> Any:
        return next(r for name, r in self.runs.items() if name.startswith("tune "))

    @property
    def trials(self) -> list[Any]:
        return [self.runs[f"trial-{n}"] for n in range(TRIALS)]

    def page(self, route: str) -> str:
        """A page of the UI, in its Model training view (a fresh browser opens the GenAI one)."""
        return f"{self.url}/#/{route}{'&' if '?' in route else '?'}workflowType=machine_learning"


@pytest.fixture(scope="module")
def pipeline(browser: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """The stages as `dvc repro` runs them, into a real tracking server (`browser` first: no
    Chromium skips before any training)."""
    from cnnops.evaluate import evaluate_stage
    from cnnops.train import train_stage
    from cnnops.tune_stage import tune_stage

    folder = tmp_path_factory.mktemp("dashboard")
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    with mlflow_server(folder / "mlflow") as url, pytest.MonkeyPatch.context() as env:
        env.chdir(folder)
        env.setenv("MLFLOW_TRACKING_URI", url)
        overrides = [f"train.max_epochs={EPOCHS}", f"tune.n_trials={TRIALS}", *TINY]
        config = load_config(folder / "params.yaml", ["train.accelerator=cpu", *overrides])
        prepared(config)
        train_stage(config)
        tune_stage(config)
        registry.register(config)
        evaluate_stage(config)
        registry.promote(config)
        client = tracking.client(config.mlflow)
        experiment = client.get_experiment_by_name(config.mlflow.experiment)
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        yield Pipeline(url, folder, config, experiment.experiment_id, runs)


def close_assistant(page: Page) -> None:
    """MLflow's assistant panel opens beside every page; closed, the page has the width."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def toggle_columns(page: Page, *names: str) -> None:
    """Show (or hide) runs-table columns through the Columns menu, as a person picks them."""
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        page.get_by_role("dialog").get_by_text(name, exact=True).click()
    page.keyboard.press("Escape")


def expand_study(page: Page, pipeline: Pipeline) -> None:
    study = page.get_by_role("gridcell").filter(has_text=pipeline.study.info.run_name)
    study.get_by_role("button").click()  # the + before a parent run's name
    page.get_by_role("link", name=f"trial-{TRIALS - 1}", exact=True).wait_for()


def test_cnnops_ui_opens_the_experiment_on_its_runs_with_val_acc(
    pipeline: Pipeline, page: Page
) -> None:
    out = cnnops("ui", cwd=pipeline.folder, check=True).stdout
    url = pipeline.page(f"experiments/{pipeline.experiment_id}")
    assert out.strip() == f"MLflow UI: {url}"
    page.goto(url)
    page.get_by_role("link", name="train", exact=True).wait_for(timeout=SLOW_PAGE)
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()  # not the GenAI overview
    close_assistant(page)
    toggle_columns(page, "Dataset", "Source", "val/acc", "optuna.state")
    expand_study(page, pipeline)
    expect(page.get_by_role("columnheader", name="val/acc", exact=True).first).to_be_visible()
    for run in [pipeline.runs["train"], *pipeline.trials]:
        # ag-grid draws a row in parts (pinned name, scrolling cells), each with the run's id.
        row = page.locator(f"[role=row][row-id='{run.info.run_id}']")
        for shown in (str(run.data.metrics["val/acc"]), run.data.tags.get("optuna.state", "-")):
            row = row.filter(has_text=shown)
        expect(row.first).to_be_visible()
    screenshot(page, "mlflow-experiment-runs")
    experiment = tracking.client(pipeline.config.mlflow).get_experiment(pipeline.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_study_run_lists_its_trials_and_each_trial_its_number_state_and_levers(
    pipeline: Pipeline, page: Page
) -> None:
    import optuna

    from cnnops import studies

    study = optuna.load_study(
        study_name=pipeline.study.data.tags["optuna.study"],
        storage=studies.open_storage(
            str(pipeline.folder / studies.storage_url(pipeline.config)), print
        ),
    )
    for trial, run in zip(study.trials, pipeline.trials, strict=True):
        assert run.data.tags["mlflow.parentRunId"] == pipeline.study.info.run_id
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["optuna.state"] == trial.state.name.lower()  # complete or pruned
        assert {
            f"hp.{k}": str(v) for k, v in trial.params.items()
        }.items() <= run.data.params.items()
    page.goto(
        pipeline.page(f"experiments/{pipeline.experiment_id}/runs/{pipeline.study.info.run_id}")
    )
    page.get_by_role("heading", name=pipeline.study.info.run_name).wait_for(timeout=SLOW_PAGE)
    close_assistant(page)
    children = page.get_by_text("Child runs").locator("xpath=..")
    for n in range(TRIALS):
        expect(children.get_by_role("link", name=f"trial-{n}", exact=True)).to_be_visible()
    screenshot(page, "mlflow-study-run")


def test_two_trials_compare_side_by_side_with_their_curves(pipeline: Pipeline, page: Page) -> None:
    first, second = pipeline.trials[:2]
    page.goto(pipeline.page(f"experiments/{pipeline.experiment_id}"))
    page.get_by_role("link", name="train", exact=True).wait_for(timeout=SLOW_PAGE)
    close_assistant(page)
    expand_study(page, pipeline)
    for run in (first, second):
        row = page.locator(f"[role=row][row-id='{run.info.run_id}']")
        row.get_by_role("checkbox").first.check()
    page.get_by_role("button", name="Compare").click()
    page.get_by_role("heading", name="Comparing 2 Runs from 1 Experiment").wait_for()
    close_assistant(page)
    for lever in ("hp.lr", "hp.dropout_fc"):
        values = [first.data.params[lever], second.data.params[lever]]
        row = page.get_by_role("row", name=f"{lever} {' '.join(values)}")
        row.scroll_into_view_if_needed()
        expect(row).to_be_visible()
    screenshot(page, "mlflow-compare-trials")

    # The compare view's metric page: both trials' val/acc, epoch by epoch.
    ids = json.dumps([first.info.run_id, second.info.run_id])
    query = urllib.parse.urlencode(
        {
            "runs": ids,
            "metric": json.dumps("val/acc"),
            "experiments": json.dumps([pipeline.experiment_id]),
            "plot_metric_keys": json.dumps(["val/acc"]),
            "x_axis": "step",
        }
    )
    page.goto(pipeline.page(f"metric?{query}"))
    client = tracking.client(pipeline.config.mlflow)
    for run in (first, second):
        name = run.info.run_name
        expect(page.get_by_text(f"{name} (val/acc)")).to_be_visible(timeout=SLOW_PAGE)
        last = client.get_metric_history(run.info.run_id, "val/acc")[-1]
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
        expect(row).to_contain_text(f"{last.value} (step={last.step})")
    screenshot(page, "mlflow-compare-val-acc")


def test_a_trial_shows_its_confusion_matrix_at_each_epoch(pipeline: Pipeline, page: Page) -> None:
    client = tracking.client(pipeline.config.mlflow)
    for run in [pipeline.runs["train"], *pipeline.trials]:
        epochs = {m.step for m in client.get_metric_history(run.info.run_id, "val/acc")}
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        for key in ("val~confusion_matrix", "val~misclassified"):
            steps = {int(p.split("+step+")[1].split("+")[0]) for p in images if f"/{key}+" in p}
            assert steps == epochs, (run.info.run_name, key, images)
    train = client.get_run(pipeline.runs["train"].info.run_id)
    # Sampled every second: even a run of seconds has its CPU and memory curve.
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        train.data.metrics
    )

    trial = next(r for r in pipeline.trials if r.data.tags["optuna.state"] == "complete")
    last = int(trial.data.metrics["epochs_run"])
    route = f"experiments/{pipeline.experiment_id}/runs/{trial.info.run_id}/model-metrics"
    fetched: list[str] = []  # the UI shows each picture from a blob of what it fetched
    page.on("response", lambda r: fetched.append(urllib.parse.unquote(urllib.parse.unquote(r.url))))
    page.goto(pipeline.page(route))
    heading = page.get_by_role("heading", name="val/confusion_matrix")
    heading.wait_for(timeout=SLOW_PAGE)
    expect(page.get_by_role("heading", name="val/misclassified")).to_be_visible()
    card = page.get_by_test_id("experiment-view-compare-runs-card").filter(has=heading)
    card.locator("[data-component-id=fullscreen_button_chartcard]").click()
    dialog = page.get_by_role("dialog", name="val/confusion_matrix")
    dialog.wait_for()
    page.wait_for_function(FADED_IN)  # the slider is where it stays
    # The step slider opens on step 0, before any epoch: a person drags it to the last epoch.
    track = dialog.locator("span[data-orientation=horizontal]").first.bounding_box()
    assert track is not None
    page.mouse.click(track["x"] + track["width"] - 1, track["y"] + track["height"] / 2)
    expect(dialog.get_by_role("slider").first).to_have_attribute("aria-valuenow", str(last))
    shown = dialog.locator("img").first
    loaded = "img => img.complete && img.naturalWidth > 0"
    page.wait_for_function(loaded, arg=shown.element_handle())
    assert any(f"val~confusion_matrix+step+{last}+" in url for url in fetched), fetched
    pictures = page.locator("img").count()
    shown.click()  # the full-size picture, as a person opens it
    expect(page.locator("img")).to_have_count(pictures + 1)
    page.wait_for_function(loaded, arg=page.locator("img").last.element_handle())
    page.wait_for_function(FADED_IN)
    screenshot(page, "mlflow-trial-confusion-matrix")


def test_the_registered_model_shows_its_champion(pipeline: Pipeline, page: Page) -> None:
    name = pipeline.config.registry.model_name
    page.goto(pipeline.page(f"models/{urllib.parse.quote(name)}"))
    version = page.get_by_role("row").filter(
        has=page.get_by_role("link", name="Version 1", exact=True)
    )
    version.wait_for(timeout=SLOW_PAGE)
    close_assistant(page)
    expect(version).to_contain_text("champion")
    expect(version).to_contain_text("challenger")
    screenshot(page, "mlflow-registered-model")


def test_cnnops_dashboard_shows_the_study_in_optuna_dashboard(
    pipeline: Pipeline, page: Page
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "cnnops"), "dashboard", "--port", str(port)]
    log = pipeline.folder / "dashboard.log"
    with running(command, f"{url}/api/studies", log, cwd=pipeline.folder):
        with urllib.request.urlopen(f"{url}/api/studies") as response:
            found = json.load(response)["study_summaries"]
        name = pipeline.study.data.tags["optuna.study"]
        assert [s["study_name"] for s in found] == [name]
        page.goto(f"{url}/dashboard/")
        page.get_by_text(name).first.click()
        best = int(pipeline.study.data.metrics["best_trial"])
        expect(page.get_by_text(f"Best Trial (number={best})")).to_be_visible()
        # The heading: once its plot has drawn, the axis title holds the same text.
        expect(page.get_by_role("heading", name="Hyperparameter Importance")).to_be_visible()
        screenshot(page, "optuna-dashboard-study")


def test_cnnops_dashboard_without_a_study_says_what_to_run(tmp_path: Path) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    result = cnnops("dashboard", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("no study yet (tune.storage); run `cnnops tune` first")


def test_cnnops_dashboard_makes_no_sqlite_storage_where_there_is_none(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import optuna_dashboard
    from typer.testing import CliRunner

    from cnnops.cli import app

    monkeypatch.setattr(optuna_dashboard, "run_server", lambda *_, **__: print("served"))
    result = CliRunner().invoke(app, ["dashboard", "--set", "tune.storage=sqlite:///studies.db"])
    assert result.exit_code == 2 and "served" not in result.stdout
    assert result.stderr.strip().endswith("no study yet (tune.storage); run `cnnops tune` first")
    assert not (workdir / "studies.db").exists()
