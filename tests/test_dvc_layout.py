"""The DVC layout: variants are DVC projects of their own with a generated dvc.yaml, every
revision and experiment can be compared, plots pages work offline, and a clone reproduces.

One module fixture builds a git + DVC repository from the checkout's files, runs the root
pipeline against a real `mlflow server` (team mode) and the mnist variant's first stages on the
embedded digits, commits, makes a second commit and an experiment, and pushes to a local DVC
remote; the tests then read it, or a `git clone` of it, with the real `dvc` and `git`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, ROOT, set_params
from tests.mlflow_server import mlflow_server

STAGES = ["fetch", "prepare", "train", "tune", "register", "evaluate", "promote"]
UP_TO_DATE = "Data and pipelines are up to date."
VARIANTS = sorted(p.parent.name for p in (ROOT / "pipelines").glob("*/params.yaml"))
TINY = ["train.max_epochs=1", "tune.n_trials=1"]
# A variant runs here on the embedded digits (8x8): 3x3 'same' convolutions fit any variant's
# two blocks, and no dataset is downloaded.
TINY_VARIANT = [
    "fetch.source=digits",
    "fetch.mirror=null",
    "model.conv[0].kernel=3",
    "model.conv[0].padding=same",
    "model.conv[1].kernel=3",
    "model.conv[1].padding=same",
    *TINY,
]
# The transfer variant on the embedded digits: MobileNetV2 from scratch, seeing them at 16 px.
TINY_PRETRAINED = [
    "fetch.source=digits",
    "fetch.url=null",
    "prepare.image_size=null",
    "model.weights=null",
    "model.weights_sha256=null",
    "model.freeze=none",
    "model.unfreeze_epoch=null",
    "model.input_size=16",
    *TINY,
]


def tiny(variant: str) -> list[str]:
    return TINY_PRETRAINED if variant == "transfer" else TINY_VARIANT


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} in {cwd} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def sh(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """The command's output, stdout then stderr; fails the test on a non-zero exit."""
    result = run(*args, cwd=cwd, env=env)
    return result.stdout + result.stderr


def sh_json(*args: str, cwd: Path) -> Any:
    """The JSON a `dvc ... --json` command prints on stdout (warnings go to stderr)."""
    return json.loads(run(*args, "--json", cwd=cwd).stdout)


def ran_stages(log: str) -> list[str]:
    return re.findall(r"Running stage '(?:[^']*:)?([a-z]+)'", log)


def team_env(url: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": url}


def embedded_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)  # sqlite:///mlflow.db of the checkout, from params
    return env


def checkout_files() -> list[str]:
    """The checkout's files as a commit of it would hold them: tracked and not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    return [name for name in listed if name and (ROOT / name).is_file()]


@dataclass(frozen=True)
class Project:
    origin: Path
    remote: Path
    server: str
    baseline: str  # the commit whose pipeline ran first
    experiment: str  # a root experiment on the baseline (evaluate.batch_size=256)

    def variant(self, name: str) -> Path:
        return self.origin / "pipelines" / name

    def clone(self, name: str) -> Path:
        target = self.origin.parent / name
        sh("git", "clone", "-q", str(self.origin), str(target), cwd=self.origin.parent)
        return target


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    base = tmp_path_factory.mktemp("layout")
    origin, remote = base / "origin", base / "remote"
    for name in checkout_files():
        (origin / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, origin / name)
    set_params(origin / "params.yaml", TINY)
    for variant in VARIANTS:
        set_params(origin / "pipelines" / variant / "params.yaml", tiny(variant))
    sh("git", "init", "-q", cwd=origin)
    sh("git", "config", "user.email", "ci@example.com", cwd=origin)
    sh("git", "config", "user.name", "ci", cwd=origin)
    projects = [origin, *(origin / "pipelines" / v for v in VARIANTS)]
    for folder in projects:
        sh("dvc", "remote", "add", "-d", "store", str(remote), cwd=folder)
    sh("git", "add", "-A", cwd=origin)
    sh("git", "commit", "-qm", "project", cwd=origin)

    with mlflow_server(base / "mlflow") as url:
        env = team_env(url)
        assert ran_stages(sh("dvc", "repro", cwd=origin, env=env)) == STAGES
        for variant in VARIANTS:  # up to train: its metrics and plots, in a fraction of the time
            log = sh("dvc", "repro", "train", cwd=origin / "pipelines" / variant, env=env)
            assert ran_stages(log) == STAGES[:3]
        sh("git", "add", "-A", cwd=origin)
        sh("git", "commit", "-qm", "baseline", cwd=origin)
        baseline = sh("git", "rev-parse", "HEAD", cwd=origin).strip()
        for folder in projects:
            sh("dvc", "push", cwd=folder, env=env)

        # An experiment on each project (the root one reruns evaluate and promote only), then
        # the second commit holds their results.
        log = sh(
            "dvc",
            "exp",
            "run",
            "-n",
            "eval256",
            "-S",
            "evaluate.batch_size=256",
            cwd=origin,
            env=env,
        )
        assert ran_stages(log) == ["evaluate", "promote"]
        for variant in VARIANTS:  # train is up to date: the experiment changes a param only
            exp = ["dvc", "exp", "run", "-n", f"{variant}-eval500", "-S", "evaluate.batch_size=500"]
            sh(*exp, "train", cwd=origin / "pipelines" / variant, env=env)
        sh("git", "add", "-A", cwd=origin)
        sh("git", "commit", "-qm", "evaluate in larger batches", cwd=origin)
        for folder in projects:
            sh("dvc", "push", cwd=folder, env=env)
        yield Project(origin, remote, url, baseline, "eval256")


# --- the layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_a_dvc_project_whose_dvc_yaml_is_generated(variant: str, tmp_path: Path) -> None:
    folder = ROOT / "pipelines" / variant
    # A real file (git mode 100644, no symbolic link) in a DVC project of its own.
    staged = sh("git", "ls-files", "-s", f"pipelines/{variant}/dvc.yaml", cwd=ROOT)
    assert staged.startswith("100644 "), staged
    assert not (folder / "dvc.yaml").is_symlink()
    assert (folder / ".dvc" / "config").is_file()
    # Its code deps reach the package source from the variant's folder.
    from cnnops.config import read_params

    src = folder / read_params(folder / "params.yaml")["paths"]["src"]
    assert (src / "train.py").is_file() and (src / "registry").is_dir(), src

    # `make variants` in a copy writes exactly the committed file, and turns a new folder with a
    # params.yaml into a DVC project of its own.
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    copy = tmp_path / "pipelines" / variant
    copy.mkdir(parents=True)
    shutil.copy(folder / "params.yaml", copy / "params.yaml")
    shutil.copytree(
        folder / ".dvc",
        copy / ".dvc",
        ignore=shutil.ignore_patterns("config.local", "tmp", "cache"),
    )
    (copy / "dvc.yaml").symlink_to(
        "../../dvc.yaml"
    )  # the old layout: replaced, not written through
    new = tmp_path / "pipelines" / "new-variant"
    new.mkdir()
    shutil.copy(folder / "params.yaml", new / "params.yaml")
    sh("git", "init", "-q", cwd=tmp_path)
    sh("make", "-s", "variants", cwd=tmp_path)
    assert (copy / "dvc.yaml").read_text() == (folder / "dvc.yaml").read_text()
    assert not (copy / "dvc.yaml").is_symlink()
    assert (tmp_path / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()
    assert (new / "dvc.yaml").read_text() == (folder / "dvc.yaml").read_text()
    assert (new / ".dvc" / "config").is_file()
    assert "analytics = false" in (new / ".dvc" / "config").read_text()


# --- every revision comparable ---------------------------------------------------------------


def exp_show(cwd: Path) -> list[dict[str, Any]]:
    """Every row of `dvc exp show` for HEAD and HEAD~1: commits and their experiments."""
    rows = []
    for entry in sh_json("dvc", "exp", "show", "-n", "2", cwd=cwd):
        rows.append(entry)
        for experiment in entry.get("experiments") or []:
            rows.extend(experiment["revs"])
    return rows


@pytest.mark.slow
def test_status_of_an_up_to_date_checkout_says_only_that(project: Project) -> None:
    # No noise from the variants, whose stages past train never ran.
    assert sh("dvc", "status", cwd=project.origin).strip() == UP_TO_DATE
    for variant in VARIANTS:
        assert sh("dvc", "status", "train", cwd=project.variant(variant)).strip() == UP_TO_DATE


@pytest.mark.slow
def test_root_revisions_and_experiments_compare(project: Project) -> None:
    cwd = project.origin
    rows = exp_show(cwd)
    assert [r.get("error") for r in rows] == [None] * len(rows), rows
    by_name = {r.get("name") or r["rev"]: r for r in rows}
    assert project.experiment in by_name
    head_1 = next(r for r in rows if r["rev"] == project.baseline)
    for row in (by_name["workspace"], head_1, by_name[project.experiment]):
        metrics = row["data"]["metrics"]
        assert isinstance(metrics["reports/eval.json"]["data"]["test_acc"], float), row["rev"]
        assert isinstance(metrics["reports/train.json"]["data"]["best_val_acc"], float), row["rev"]
    batch = {
        name: row["data"]["params"]["params.yaml"]["data"]["evaluate"]["batch_size"]
        for name, row in (("head~1", head_1), ("exp", by_name[project.experiment]))
    }
    assert batch == {"head~1": 512, "exp": 256}

    metrics = sh_json("dvc", "metrics", "diff", "HEAD~1", "--all", cwd=cwd)
    test_acc = metrics["reports/eval.json"]["test_acc"]
    assert isinstance(test_acc["old"], float) and isinstance(test_acc["new"], float), test_acc
    params = sh_json("dvc", "params", "diff", "HEAD~1", cwd=cwd)
    batch = params["params.yaml"]["evaluate.batch_size"]
    assert (batch["old"], batch["new"]) == (512, 256), batch
    # The experiment compares against its baseline too.
    exp_diff = sh_json("dvc", "exp", "diff", "HEAD~1", project.experiment, cwd=cwd)
    assert exp_diff["params"]["params.yaml"]["evaluate.batch_size"]["new"] == 256

    plots = sh_json("dvc", "plots", "diff", "HEAD~1", cwd=cwd)
    for name in ("loss", "accuracy", "confusion", "tuning"):
        (plot,) = plots["data"][name]
        assert {v["rev"] for v in plot["content"]["data"]["values"]} == {"HEAD~1", "workspace"}
    assert not plots.get("errors"), plots.get("errors")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_revisions_and_experiments_compare(project: Project, variant: str) -> None:
    cwd = project.variant(variant)
    rows = exp_show(cwd)
    assert [r.get("error") for r in rows] == [None] * len(rows), rows
    names = {r.get("name") for r in rows}
    assert f"{variant}-eval500" in names
    for row in rows:
        train = row["data"]["metrics"]["reports/train.json"]["data"]
        assert isinstance(train["best_val_acc"], float), row["rev"]

    metrics = sh_json("dvc", "metrics", "diff", "HEAD~1", "--all", cwd=cwd)
    acc = metrics["reports/train.json"]["best_val_acc"]
    assert isinstance(acc["old"], float) and acc["old"] == acc["new"], acc
    params = sh_json("dvc", "params", "diff", "HEAD~1", cwd=cwd)
    batch = params["params.yaml"]["evaluate.batch_size"]
    assert batch["new"] == 500 and batch["old"] != 500, batch

    plots = sh_json("dvc", "plots", "diff", "HEAD~1", cwd=cwd)
    (loss,) = plots["data"]["loss"]
    assert {v["rev"] for v in loss["content"]["data"]["values"]} == {"HEAD~1", "workspace"}


# --- offline plots ---------------------------------------------------------------------------

CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc\s*=\s*[\"']?\s*(https?:)?//", re.IGNORECASE)


@pytest.mark.slow
def test_plots_pages_load_no_script_from_the_network(project: Project, tmp_path: Path) -> None:
    work = project.clone("plots")
    # DVC's own page loads vega from a CDN: the check below sees that.
    sh("dvc", "plots", "diff", "HEAD~1", "-o", str(tmp_path / "cdn"), cwd=work)
    assert CDN_SCRIPT.search((tmp_path / "cdn" / "index.html").read_text())

    sh(str(BIN / "python"), "-m", "cnnops.plots", cwd=work)  # what `make install` runs
    for folder in [work, *(work / "pipelines" / v for v in VARIANTS)]:
        sh("dvc", "plots", "diff", "HEAD~1", cwd=folder)  # into dvc_plots/, as a user runs it
        page = (folder / "dvc_plots" / "index.html").read_text()
        assert not CDN_SCRIPT.search(page), folder
        assert "window.vegaEmbed=" in page.replace(" ", "")  # the libraries, inlined
        assert "vegaEmbed('#" in page  # and the plots they draw
    # The template, each project's config.local and the pages stay out of git.
    assert sh("git", "status", "--porcelain", cwd=work).strip() == ""


# --- a clone reproduces ----------------------------------------------------------------------


def lock_outs(folder: Path, stage: str) -> dict[str, str]:
    from ruamel.yaml import YAML

    lock = YAML(typ="safe").load((folder / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for out in lock["stages"][stage].get("outs", [])}


@pytest.mark.slow
def test_a_clone_on_the_team_server_pulls_and_is_up_to_date(project: Project) -> None:
    clone = project.clone("team")
    env = team_env(project.server)
    sh("dvc", "pull", cwd=clone, env=env)  # exits 0: the variants' never-run outputs are apart
    assert sh("dvc", "status", cwd=clone, env=env).strip() == UP_TO_DATE
    log = sh("dvc", "repro", cwd=clone, env=env)
    assert ran_stages(log) == [] and UP_TO_DATE in log
    # The restored pointer names a version the shared registry really has.
    from mlflow import MlflowClient

    pointer = json.loads((clone / "models" / "registry.json").read_text())
    client = MlflowClient(project.server, project.server)
    version = client.get_model_version(pointer["model_name"], str(pointer["version"]))
    assert version.run_id == pointer["run_id"]
    assert (clone / "models" / "champion.onnx").stat().st_size > 0
    assert sh("git", "status", "--porcelain", cwd=clone).strip() == ""


@pytest.mark.slow
def test_a_clone_with_its_own_store_registers_without_retraining(project: Project) -> None:
    clone = project.clone("embedded")
    env = embedded_env()
    sh("dvc", "pull", cwd=clone, env=env)
    assert sh("dvc", "status", cwd=clone, env=env).strip() == UP_TO_DATE
    trained = {stage: lock_outs(clone, stage) for stage in ("train", "tune")}
    theirs = json.loads((clone / "models" / "registry.json").read_text())

    # This checkout's store (its own mlflow.db) holds none of the runs: register the pulled
    # checkpoint here, then evaluate and promote it; train and tune stay as pulled.
    log = sh("dvc", "repro", "--force", "--downstream", "register", cwd=clone, env=env)
    assert ran_stages(log) == ["register", "evaluate", "promote"]
    assert {stage: lock_outs(clone, stage) for stage in ("train", "tune")} == trained
    assert sh("dvc", "status", cwd=clone, env=env).strip() == UP_TO_DATE
    assert ran_stages(sh("dvc", "repro", cwd=clone, env=env)) == []

    from mlflow import MlflowClient

    uri = f"sqlite:///{clone / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    ours = json.loads((clone / "models" / "registry.json").read_text())
    assert ours["checkpoint_sha256"] == theirs["checkpoint_sha256"]  # the same checkpoint
    assert ours["run_id"] != theirs["run_id"]
    run = client.get_run(ours["run_id"])  # a new run in this store, with the provenance
    assert run.info.run_name == f"register-{ours['candidate']}"
    assert run.data.tags["cnnops.origin_run_id"] == theirs["run_id"] == ours["origin_run_id"]
    assert run.data.tags["git.commit"] == sh("git", "rev-parse", "HEAD", cwd=clone).strip()
    version = client.get_model_version(ours["model_name"], str(ours["version"]))
    assert version.run_id == ours["run_id"]
    promotion = json.loads((clone / "reports" / "promotion.json").read_text())
    assert promotion["champion_version"] == ours["version"]
