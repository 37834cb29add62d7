"""`cnnops retrain`: pull, reproduce, gate and report, as one local command.

The pipeline's own stages do the work: `dvc repro` retrains only what changed, `register` adds a
challenger, `evaluate` scores it against the champion and `promote` applies the gate and writes
`reports/promotion.json`. This module runs them in a DVC project (the root one or a variant's
folder), then reads what they wrote and renders `reports/retrain.{md,json}`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cnnops.errors import CnnopsError
from cnnops.runs import read_json, write_bytes

MARKER = "<!-- cnnops-retrain-report -->"
STAGES = ["fetch", "prepare", "train", "tune", "register", "evaluate", "promote"]

COMMENT_LIMIT = 60_000
"""Bytes of markdown at most, so the report fits one PR comment whole (GitHub takes 65,536
characters; the comment workflow keeps 60,000 bytes): the pictures shrink to fit, or go."""
PROMOTED, NOTHING_TO_DO, LOST = 0, 0, 3
"""Exit statuses: 0 promoted, kept without a contest, or nothing to do; 3 the challenger lost
the gate. Bad input is 2 (`cnnops.errors`), a failed `dvc pull` or `dvc repro` is 1."""


class PipelineFailed(Exception):
    """`dvc pull` or `dvc repro` failed for a reason other than bad input to `retrain` itself:
    the command's own output, shown as it ran, says why."""


@dataclass(frozen=True)
class Outcome:
    report: dict[str, Any]
    markdown: Path
    json: Path
    exit_code: int


# --- running dvc and git -------------------------------------------------------------------------


def _dvc() -> str:
    beside = Path(sys.executable).parent / "dvc"
    found = str(beside) if beside.is_file() else shutil.which("dvc")
    if found is None:
        raise CnnopsError("dvc: not found beside this Python nor on PATH; install cnnops' tools")
    return found


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True)


def _tee(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run a long command, its output shown on stderr as it comes and kept for parsing."""
    lines: list[str] = []
    proc = subprocess.Popen(
        args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            lines.append(line)
        return proc.wait(), "".join(lines)
    except BaseException:  # interrupted: the child does not outlive us
        proc.terminate()
        proc.wait()
        raise


def _json_of(args: list[str], cwd: Path) -> Any:
    """The JSON a `dvc ... --json` command prints on stdout; PipelineFailed when it fails."""
    result = _run([*args, "--json"], cwd)
    if result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise PipelineFailed(f"{' '.join(args[1:])} failed ({result.returncode}): {last[0]}")
    return json.loads(result.stdout or "{}")


def ran_stages(log: str) -> list[str]:
    """Stages `dvc repro` ran, from its log (`Running stage 'train':`, or `'dvc.yaml:train'`)."""
    return re.findall(r"Running stage '(?:[^']*:)?([\w-]+)'", log)


def restored_stages(log: str) -> list[str]:
    """Stages whose outputs DVC restored from its run cache instead of running them."""
    return re.findall(r"Stage '(?:[^']*:)?([\w-]+)' is cached - skipping run", log)


# --- input ---------------------------------------------------------------------------------------


def check_pipeline(pipeline: Path) -> Path:
    if not pipeline.is_dir():
        raise CnnopsError(f"--pipeline {pipeline}: no such folder")
    for name in ("dvc.yaml", "params.yaml"):
        if not (pipeline / name).is_file():
            raise CnnopsError(f"--pipeline {pipeline}: holds no {name}; expected a DVC project")
    if not (pipeline / ".dvc").is_dir():
        raise CnnopsError(
            f"--pipeline {pipeline}: not a DVC project (no .dvc folder; see `dvc init --subdir`)"
        )
    return pipeline


def check_base(pipeline: Path, base: str) -> str:
    """The commit `base` names in the pipeline's git repository."""
    if not base or base.startswith("-"):
        raise CnnopsError(f"--base {base!r}: expected a git ref such as HEAD or origin/main")
    result = _run(["git", "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"], pipeline)
    if result.returncode != 0:
        raise CnnopsError(f"--base {base}: not a commit in the git repository at {pipeline}")
    return result.stdout.strip()


def parse_set_lines(text: str) -> list[str]:
    """`CNNOPS_SET`: one KEY=VALUE a line (values may hold spaces); blank lines are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_overrides(params: Path, overrides: list[str]) -> None:
    """Apply validated `--set` overrides to the params file in place, keeping its comments and
    layout (a YAML round trip), so `dvc repro` sees them and `dvc.lock` records them."""
    import io

    from ruamel.yaml import YAML

    from cnnops.config import apply_override

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    data = yaml.load(params.read_text())
    for assignment in overrides:
        apply_override(data, assignment)
    stream = io.StringIO()
    yaml.dump(data, stream)
    write_bytes(params, stream.getvalue().encode())


# --- the run -------------------------------------------------------------------------------------


def _has_remote(pipeline: Path, dvc: str) -> bool:
    result = _run([dvc, "config", "core.remote"], pipeline)
    return result.returncode == 0 and bool(result.stdout.strip())


def pull(pipeline: Path, dvc: str) -> str:
    """`dvc pull --allow-missing` when a default remote is configured. Outputs the remote lacks
    (a fresh remote, a stage never pushed) are not an error: `dvc repro` rebuilds them. A remote
    that cannot be reached, or any other failure, is (PipelineFailed): retraining everything
    because the cache was out of reach would cost the device time a pull saves."""
    if not _has_remote(pipeline, dvc):
        return "no default DVC remote: nothing pulled"
    code, log = _tee([dvc, "pull", "--allow-missing"], pipeline)
    if code != 0:
        raise PipelineFailed(f"dvc pull failed ({code}); its output is above")
    return "pulled from the default DVC remote (outputs it lacks are rebuilt)"


def _stale(pipeline: Path, dvc: str) -> list[str]:
    status = _json_of([dvc, "status"], pipeline)
    return [str(k).rpartition(":")[2] for k in status] if isinstance(status, dict) else []


def _device_seconds(reports: Path, ran: list[str], since: datetime) -> dict[str, Any]:
    """Seconds spent training in this run: train.json's train_seconds when train ran, plus the
    durations of the tuning trials that started during it (reports/tune/trials.csv)."""
    train = (read_json(reports / "train.json") or {}) if "train" in ran else {}
    train_s = float(train.get("train_seconds") or 0.0)
    tune_s, trials = 0.0, 0
    trials_csv = reports / "tune" / "trials.csv"
    if "tune" in ran and trials_csv.is_file():
        with trials_csv.open(newline="") as f:
            for row in csv.DictReader(f):
                started, duration = row.get("started"), row.get("duration_s")
                if started and duration and datetime.fromisoformat(started) >= since:
                    tune_s += float(duration)
                    trials += 1
    return {
        "train_seconds": round(train_s, 2),
        "tune_seconds": round(tune_s, 2),
        "tune_trials": trials,
        "total_seconds": round(train_s + tune_s, 2),
        "counts": "wall-clock seconds of the train stage's fit plus each tuning trial started in "
        "this run, on whatever device trained (not data preparation, evaluation or start-up)",
    }


def _verdict(promotion: dict[str, Any] | None, ran: list[str]) -> str:
    if "promote" not in ran or promotion is None:
        return "not run"
    if promotion.get("promoted"):
        return "promoted"
    if promotion.get("challenger_version") == promotion.get("champion_version"):
        return "kept: the challenger already is the champion"
    return "lost"


def retrain(pipeline: Path, overrides: list[str], base: str) -> Outcome:
    """Validate the overrides, pull, write them into params.yaml, `dvc repro`, read the gate's
    decision and write reports/retrain.{md,json}; the outcome carries the exit status."""
    from cnnops.config import load_config
    from cnnops.models import check_study

    check_pipeline(pipeline)
    params = pipeline / "params.yaml"
    config = load_config(params, overrides, check_study)  # the repro may tune; nothing written yet
    base_commit = check_base(pipeline, base)
    dvc = _dvc()
    reports = pipeline / config.paths.reports
    since = datetime.now()
    started = time.perf_counter()

    pulled = pull(pipeline, dvc)
    if overrides:
        write_overrides(params, overrides)
    before = read_json(reports / "promotion.json")
    stale = _stale(pipeline, dvc)
    code, log = _tee([dvc, "repro"], pipeline)
    if code != 0:
        raise PipelineFailed(f"dvc repro failed ({code}); the failing stage's output is above")
    ran, restored = ran_stages(log), restored_stages(log)

    promotion = read_json(reports / "promotion.json")
    verdict = _verdict(promotion, ran)
    champion_before = (before or {}).get("champion_version")
    champion_after = (promotion or {}).get("champion_version") if "promote" in ran else None
    if champion_after is None:
        champion_after = champion_before
    challenger = read_json(reports / "eval.json") or {}
    champion = read_json(reports / "eval_champion.json") or {}
    train = read_json(reports / "train.json") or {}
    gap = None
    if train.get("best_train_acc") is not None and train.get("best_val_acc") is not None:
        gap = float(train["best_train_acc"]) - float(train["best_val_acc"])
    metric = (promotion or {}).get("metric", config.registry.metric)
    margin = None
    ours, theirs = (
        (promotion or {}).get("challenger_score"),
        (promotion or {}).get("champion_score"),
    )
    if ours is not None and theirs is not None:
        margin = float(ours) - float(theirs)

    report: dict[str, Any] = {
        "pipeline": str(pipeline),
        "base": base,
        "base_commit": base_commit,
        "overrides": overrides,
        "pull": pulled,
        "stale_before": stale,
        "stages_ran": ran,
        "stages_restored": restored,
        "up_to_date": not ran and not restored,
        "registered": "register" in ran,
        "verdict": verdict,
        "exit_code": LOST if verdict == "lost" else PROMOTED,
        "gate": {
            "metric": metric,
            "min_delta": config.registry.min_delta,
            "margin": margin,
            "reason": (promotion or {}).get("reason") if "promote" in ran else None,
            "challenger_version": (promotion or {}).get("challenger_version"),
            "challenger_score": (promotion or {}).get("challenger_score"),
            "champion_score": (promotion or {}).get("champion_score"),
        },
        "champion": {
            "model_name": config.registry.model_name,
            "before": champion_before,
            "after": champion_after,
            "changed": champion_after != champion_before,
        },
        "challenger_eval": challenger,
        "champion_eval": champion,
        "overfitting_gap": gap,
        "train": {k: train.get(k) for k in ("best_train_acc", "best_val_acc", "epochs_run")},
        "device_seconds": _device_seconds(reports, ran, since),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "params_diff": _json_of([dvc, "params", "diff", base_commit], pipeline),
        "metrics_diff": _json_of([dvc, "metrics", "diff", base_commit], pipeline),
    }
    report["images"] = {}
    for scale in (0.5, 0.35, 0.0):  # the largest pictures that keep the text a PR comment
        report["images"] = {
            name: _image(reports / f"{name}.png", scale) if scale else None
            for name in ("train_curves", "eval_confusion")
        }
        if len(render(report).encode()) <= COMMENT_LIMIT:
            break
    from cnnops import reports as reporting

    md, js = reports / "retrain.md", reports / "retrain.json"
    write_bytes(md, render(report).encode())
    reporting.write_json(js, report)
    return Outcome(report, md, js, report["exit_code"])


def _image(path: Path, scale: float) -> str | None:
    from cnnops.reports import png_data_uri

    return png_data_uri(path, scale)


# --- the markdown --------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _diff_table(diff: Any, with_change: bool) -> str:
    rows = []
    for file, entries in sorted((diff or {}).items()):
        for key, change in sorted((entries or {}).items()):
            if not isinstance(change, dict):
                continue
            row = [file, key, change.get("old"), change.get("new")]
            rows.append([*row, change.get("diff")] if with_change else row)
    if not rows:
        return "_no changes_"
    header = ["file", "key", "base", "now"] + (["change"] if with_change else [])
    return _table(header, rows)


def render(report: dict[str, Any]) -> str:
    """reports/retrain.md: the marker line first, so a workflow finds its own PR comment."""
    gate, champ, dev = report["gate"], report["champion"], report["device_seconds"]
    verdict = report["verdict"]
    if report["up_to_date"]:
        headline = "Nothing to do: data, params and code are unchanged; nothing was retrained."
    elif verdict == "promoted":
        headline = f"The challenger (version {gate['challenger_version']}) was promoted."
    elif verdict == "lost":
        headline = (
            f"The challenger (version {gate['challenger_version']}) lost the gate; "
            f"the champion stays version {champ['after']}."
        )
    elif verdict == "not run":
        headline = "The gate did not run: no new challenger."
    else:
        headline = f"The champion is unchanged ({verdict})."
    ran = ", ".join(report["stages_ran"]) or "none (up to date)"
    lines = [
        MARKER,
        "## Retraining report",
        "",
        f"**{headline}**",
        "",
        f"- Pipeline: `{report['pipeline']}`; compared with `{report['base']}` "
        f"({report['base_commit'][:12]})",
        f"- Stages that ran: {ran}",
    ]
    if report["stages_restored"]:
        lines.append(f"- Restored from DVC's run cache: {', '.join(report['stages_restored'])}")
    lines += [
        f"- New model version registered: {'yes' if report['registered'] else 'no'}",
        f"- Champion changed: {'yes' if champ['changed'] else 'no'} "
        f"({champ['model_name']}: version {_cell(champ['before'])} → {_cell(champ['after'])})",
        f"- Training seconds: {dev['total_seconds']:g} (train {dev['train_seconds']:g}, "
        f"tuning {dev['tune_seconds']:g} over {dev['tune_trials']} trials): {dev['counts']}",
        f"- Overfitting gap (best train acc − best val acc): {_cell(report['overfitting_gap'])}",
        f"- Overrides: {', '.join(f'`{o}`' for o in report['overrides']) or 'none'}",
        "",
        "### Promotion gate",
        "",
    ]
    metric = gate["metric"]
    rows: list[list[Any]] = []
    for name in (metric, "test_acc", "macro_f1", "test_loss"):
        if any(name == r[0] for r in rows):
            continue
        ours, theirs = report["challenger_eval"].get(name), report["champion_eval"].get(name)
        if ours is not None or theirs is not None:
            rows.append([name, theirs, ours])
    if verdict == "not run":
        lines.append("The gate did not run in this retraining (no new challenger).")
    else:
        lines += [
            _table(["metric", "champion", "challenger"], rows),
            "",
            f"Verdict: **{verdict}** on `{metric}`, margin {_cell(gate['margin'])} "
            f"(needs > 0 and ≥ min_delta {gate['min_delta']:g}): {_cell(gate['reason'])}",
        ]
    lines += [
        "",
        f"### Params changed since `{report['base']}`",
        "",
        _diff_table(report["params_diff"], with_change=False),
        "",
        f"### Metrics changed since `{report['base']}`",
        "",
        _diff_table(report["metrics_diff"], with_change=True),
        "",
    ]
    for name, title in (
        ("train_curves", "Training curves"),
        ("eval_confusion", "Confusion matrix"),
    ):
        uri = report["images"].get(name)
        if uri:
            lines += [f"### {title}", "", f'<img src="{uri}" alt="{title}" width="640">', ""]
    return "\n".join(lines)


def env_overrides() -> list[str]:
    return parse_set_lines(os.environ.get("CNNOPS_SET", ""))
