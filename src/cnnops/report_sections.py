"""The sections of `cnnops report`, each read from what the pipeline's stages wrote.

A piece not written yet is a short note in its section, never a traceback. The only writes: the
figures the report draws (into `figures`), and the cost totals, logged to the train run and the
study's run in MLflow where the store holds them.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnops import reports
from cnnops.errors import CnnopsError
from cnnops.fit import FLAT_DROP, GAP_ACC, TURN_MIN_RISE, TURN_RISE, UNDERFIT_ACC, fit_verdict
from cnnops.report_html import Block, Callout, Figure, Note, NotRun, Section, Table, fmt
from cnnops.runs import read_json

if TYPE_CHECKING:
    import optuna

    from cnnops.config import Config


def caption(name: str) -> str:
    """`gradcam/first_layer-kernels` → `gradcam / first layer kernels`."""
    return re.sub(r"[_-]+", " ", name).replace("/", " / ")


# --- 1. data --------------------------------------------------------------------------------------


def data_section(config: Config) -> Section:
    stats = read_json(config.paths.reports / "data.json")
    if stats is None:
        return Section("data", "Data", [NotRun("run `cnnops prepare`.")])
    splits = stats.get("splits") or {}
    source = config.fetch.source + (f" ({config.fetch.url})" if config.fetch.url else "")
    facts = [
        ["source", source],
        ["classes", str(stats.get("num_classes"))],
        ["image (channels × height × width)", " × ".join(map(str, stats.get("shape") or []))],
        ["split sizes", " · ".join(f"{k} {v.get('total')}" for k, v in splits.items())],
        [
            "pixel mean / std (training split)",
            f"{fmt(stats.get('mean'))} / {fmt(stats.get('std'))}",
        ],
    ]
    facts += [[f"files {k}", str(len(stats[k]))] for k in ("skipped", "ignored") if stats.get(k)]
    blocks: list[Block] = [Table(["", ""], facts)]
    classes = list((next(iter(splits.values()), None) or {}).get("per_class") or {})
    if classes:
        counts = [[c, *(s.get("per_class", {}).get(c) for s in splits.values())] for c in classes]
        blocks.append(Table(["class", *splits], counts))
    return Section("data", "Data", blocks)


# --- 2. fit ---------------------------------------------------------------------------------------

THRESHOLDS = (
    f"How it is judged (`cnnops.fit`): underfitting when the last training accuracy is below "
    f"{UNDERFIT_ACC:g} (without accuracies: training loss falling less than {FLAT_DROP:.0%}); "
    f"overfitting when validation loss ends at least {TURN_RISE:.0%} and {TURN_MIN_RISE:g} above "
    f"its lowest while training loss keeps falling, or when training accuracy exceeds validation "
    f"accuracy by more than {GAP_ACC:g}; a good fit otherwise."
)


def read_curves(path: Path) -> list[dict[str, float]]:
    """reports/train_curves.csv as numbers."""
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def fit_section(config: Config, figures: Path) -> tuple[Section, str | None]:
    """The curves with the gap shaded, the verdict and what early stopping did; and the kind."""
    path, title = config.paths.reports / "train_curves.csv", "Training curves and fit"
    if not path.is_file():
        return Section("fit", title, [NotRun("run `cnnops train`.")]), None
    try:
        rows = read_curves(path)
        verdict = fit_verdict(rows)
    except ValueError as e:
        return Section("fit", title, [Note(f"`{path.as_posix()}` is unreadable: {e}.")]), None
    train = read_json(config.paths.reports / "train.json") or {}
    marks = {"validation loss turned": verdict.turn_epoch} if verdict.turn_epoch else {}
    if train.get("best_epoch") and train["best_epoch"] != verdict.turn_epoch:
        marks["best checkpoint"] = int(train["best_epoch"])
    if train.get("stopped_early"):
        marks["early stop"] = int(train["epochs_run"])
    reports.plot_fit(rows, figures / "fit.png", marks, f"{verdict.kind}: {config.model.name}")
    reason = verdict.reason[0].upper() + verdict.reason[1:]
    blocks: list[Block] = [
        Callout(
            f"Verdict: {verdict.kind}. {reason}.", "good" if verdict.kind == "good fit" else "warn"
        ),
        stopping(config, train, len(rows)),
        Figure(
            figures / "fit.png", "loss and accuracy per epoch; shaded: the train/validation gap"
        ),
        THRESHOLDS,
    ]
    return Section("fit", title, blocks), verdict.kind


def stopping(config: Config, train: dict[str, Any], epochs: int) -> str:
    """What early stopping did, by the settings of the run itself (reports/config.resolved.yaml)."""
    from cnnops.config import read_params

    resolved = config.paths.reports / "config.resolved.yaml"
    settings = (read_params(resolved) if resolved.is_file() else {}).get("train") or {}
    early = settings.get("early_stopping") or config.train.early_stopping.model_dump()
    limit = settings.get("max_epochs", config.train.max_epochs)
    ran, best = train.get("epochs_run", epochs), train.get("best_epoch")
    how = f"`{early['monitor']}`, patience {early['patience']}"
    kept = f"; the best checkpoint is from epoch {best}" if best else ""
    if not early.get("enabled"):
        return f"Early stopping was off: the run trained all {ran} epochs{kept}."
    if train.get("stopped_early"):
        wait = f", {ran - best} epochs after the best one" if best else ""
        return f"Early stopping ({how}) stopped the run after epoch {ran} of {limit}{wait}{kept}."
    return f"Early stopping ({how}) did not trigger: the run trained {ran} of {limit} epochs{kept}."


# --- 3. evaluation --------------------------------------------------------------------------------


def evaluation_section(config: Config) -> Section:
    folder = config.paths.reports
    result = read_json(folder / "eval.json")
    blocks: list[Block] = []
    if result:
        blocks.append(
            f"The challenger (`{result.get('model_name')}` version {result.get('model_version')}) "
            f"on the test split: accuracy {fmt(result.get('test_acc'))}, macro F1 "
            f"{fmt(result.get('macro_f1'))}, {result.get('test_samples')} images, "
            f"{fmt(result.get('images_per_s'))} images/s."
        )
    keys = ["precision", "recall", "f1", "support"]
    per_class = read_json(folder / "eval_per_class.json") or {}
    if per_class:
        rows = [[c, *(v.get(k) for k in keys)] for c, v in per_class.items()]
        blocks.append(Table(["class", *keys], rows))
    for name, text in (
        ("eval_confusion.png", "confusion matrix on the test split (rows: actual)"),
        ("eval_misclassified.png", "misclassified test images, actual → predicted"),
    ):
        if (folder / name).is_file():
            blocks.append(Figure(folder / name, text))
    title = "Test set: confusion and mistakes"
    return Section("evaluation", title, blocks or [NotRun("run `cnnops evaluate`.")])


# --- 4. the study ---------------------------------------------------------------------------------

VIEWS = {"optimization_history": 1, "param_importances": 2, "parallel_coordinate": 3}
"""Optuna's views of a study, and the complete trials each needs (with two, the parallel
coordinates show the worse trial's line in near-white: nothing to read)."""


def open_study(config: Config) -> tuple[optuna.Study | None, Note]:
    """The study the tune stage last ran, from its storage; or None and why not."""
    import optuna

    from cnnops import studies
    from cnnops.team import mask
    from cnnops.tracking import first_line

    url = studies.storage_url(config)
    if not studies.storage_exists(url):
        return None, NotRun(f"no study storage at `{url}`; run `cnnops tune`.")
    name = (read_json(config.paths.reports / "tune" / "tune.json") or {}).get("study")
    try:
        name = name or studies.study_name(config, config.paths.prepared)
        storage = studies.open_storage(url, lambda *_: None)
        return optuna.load_study(study_name=name, storage=storage), Note("")
    except KeyError:
        return None, NotRun(f"`{mask(url)}` holds no study `{name}`; run `cnnops tune`.")
    except Exception as e:  # unreachable, refused, corrupt: the rest of the report still counts
        return None, Note(
            f"The study could not be read: {e if isinstance(e, CnnopsError) else first_line(e)}"
        )


def study_section(config: Config, study: optuna.Study | None, why: Note, figures: Path) -> Section:
    title, metric = "Tuning study", f"`{config.tune.metric}`"
    if study is None:  # the plots the tune stage drew, if it left any
        drawn = [config.paths.reports / "tune" / f"{view}.png" for view in VIEWS]
        return Section(
            "study", title, [why, *(Figure(p, caption(p.stem)) for p in drawn if p.is_file())]
        )
    trials = study.get_trials(deepcopy=False)
    n = {s: sum(t.state.name.lower() == s for t in trials) for s in ("complete", "pruned", "fail")}
    blocks: list[Block] = [
        f"Study `{study.study_name}`, {study.direction.name.lower()} {metric}: {len(trials)} "
        f"trials, {n['complete']} complete, {n['pruned']} pruned, {n['fail']} failed."
    ]
    if n["complete"]:
        best = study.best_trial
        blocks.append(f"Best: trial {best.number}, {metric} = {fmt(best.value)}, with")
        blocks.append(Table(["lever", "value"], [[k, v] for k, v in best.params.items()]))
    for view, needs in VIEWS.items():
        if n["complete"] < needs:
            blocks.append(
                Note(
                    f"{caption(view)}: needs {needs} complete trials, the study has {n['complete']}."
                )
            )
            continue
        try:
            reports.plot_study_view(study, view, figures / f"{view}.png")
        except (ValueError, RuntimeError) as e:
            blocks.append(Note(f"{caption(view)}: Optuna could not draw it ({e})."))
            continue
        blocks.append(Figure(figures / f"{view}.png", caption(view)))
    return Section("study", title, blocks)


# --- 5. champion vs challenger --------------------------------------------------------------------


def registry_section(config: Config) -> Section:
    folder, metric = config.paths.reports, config.registry.metric
    gate = read_json(folder / "promotion.json")
    ours, theirs = (read_json(folder / f"{n}.json") or {} for n in ("eval", "eval_champion"))
    blocks: list[Block] = []
    if gate:
        won = bool(gate.get("promoted"))
        text = f"{'Promoted' if won else 'Champion kept'}: {gate.get('reason')}."
        blocks.append(Callout(text, "good" if won else "warn"))
    if ours:
        keys = dict.fromkeys(["model_version", metric, "test_acc", "macro_f1", "images_per_s"])
        rows = [[k, theirs.get(k), ours.get(k)] for k in keys]
        blocks.append(Table(["", "champion (before the gate)", "challenger"], rows))
        blocks.append(
            f"The gate: the challenger must beat the champion's `{metric}` by at least "
            f"{config.registry.min_delta:g}."
        )
    if gate and gate.get("onnx_parity_ok") is not None:
        parity = "passes" if gate["onnx_parity_ok"] else "FAILS"
        diff = fmt(gate.get("onnx_max_abs_diff"))
        blocks.append(f"ONNX export of the champion: parity {parity} (max |Δp| {diff}).")
    if not blocks:
        blocks.append(NotRun("run `cnnops register`, `cnnops evaluate` and `cnnops promote`."))
    return Section("registry", "Champion vs challenger", [*blocks, registry_now(config)])


def registry_now(config: Config) -> Block:
    """The aliases as the registry holds them now (a rollback moves them after promotion.json)."""
    from cnnops import registry, tracking
    from cnnops.team import mask

    uri, name = tracking.tracking_uri(config.mlflow), config.registry.model_name
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return Note(f"No MLflow store at `{uri}` yet: nothing is registered.")
    try:
        client = registry.connect(config.mlflow)
        aliases = (registry.CHAMPION, registry.CHALLENGER)
        found = {a: registry.version_by_alias(client, name, a) for a in aliases}
    except CnnopsError as e:
        return Note(f"The registry at `{mask(uri)}` could not be read: {e}")
    if not any(found.values()):
        return Note(f"`{name}` has no @champion or @challenger in the registry yet.")
    now = ", ".join(f"@{a} = version {v.version}" for a, v in found.items() if v is not None)
    return f"In the registry now: `{name}` {now}."


# --- 6. cost --------------------------------------------------------------------------------------

COSTS = ("device_seconds", "peak_memory_mb")
COST_NOTE = (
    "Device-seconds: training seconds × devices. Peak memory: on a GPU the memory allocated on "
    "it, on a CPU the process's resident set. Pruned and failed trials record neither, only "
    "their wall-clock time; the study's totals cover the trials that recorded them. The train "
    "run's wall-clock is its fit; a trial's is the whole trial."
)


def study_cost(trials: list[Any]) -> dict[str, float]:
    """Device-seconds summed and the peak memory over the trials that recorded them."""
    costed = [m for t in trials if "device_seconds" in (m := t.user_attrs.get("metrics", {}))]
    return {
        "study_device_seconds": round(sum(m["device_seconds"] for m in costed), 2),
        "study_peak_memory_mb": max((m.get("peak_memory_mb") or 0.0 for m in costed), default=0.0),
        "study_trials_costed": len(costed),
    }


def _trial_row(trial: Any) -> list[Any]:
    m = trial.user_attrs.get("metrics", {})
    wall = trial.duration.total_seconds() if trial.duration else None
    epochs = m.get("epochs_run") or len(trial.intermediate_values)
    return [f"trial {trial.number} ({trial.state.name.lower()})", *map(m.get, COSTS), epochs, wall]


def cost_section(config: Config, study: optuna.Study | None) -> Section:
    train = read_json(config.paths.reports / "train.json") or {}
    rows: list[list[Any]] = []
    if train:
        epochs, wall = train.get("epochs_run"), train.get("train_seconds")
        rows.append(["train run", *map(train.get, COSTS), epochs, wall])
    trials = study.get_trials(deepcopy=False) if study is not None else []
    rows += [_trial_row(t) for t in trials]
    totals = study_cost(trials)
    if trials:
        wall = round(sum(t.duration.total_seconds() for t in trials if t.duration), 2)
        costs = (totals["study_device_seconds"], totals["study_peak_memory_mb"])
        rows.append(["study, all trials", *costs, None, wall])
    if not rows:
        return Section("cost", "Cost", [NotRun("run `cnnops train` or `cnnops tune`.")])
    header = ["run", "device-seconds", "peak memory (MB)", "epochs", "wall-clock (s)"]
    blocks: list[Block] = [Table(header, rows), COST_NOTE]
    return Section("cost", "Cost", blocks + log_costs(config, train, study, totals))


def log_costs(
    config: Config, train: dict[str, Any], study: optuna.Study | None, totals: dict[str, float]
) -> list[Block]:
    """The costs logged to the train run and the study's run in MLflow; what happened, in words."""
    from cnnops import tracking

    targets = []
    run = (read_json(config.paths.models / "train" / "run.json") or {}).get("mlflow_run_id")
    if run and all(train.get(k) is not None for k in COSTS):
        targets.append(("train run", run, {k: train[k] for k in COSTS}, train.get("epochs_run", 0)))
    parent = study.user_attrs.get("mlflow_parent_run_id") if study is not None else None
    if study is not None and parent and totals["study_trials_costed"]:
        targets.append(("study run", parent, totals, len(study.trials)))
    lines: list[Block] = []
    try:
        if targets:
            tracking.check_reachable(config.mlflow)
        for what, run_id, metrics, step in targets:
            logged = tracking.update_metrics(config.mlflow, run_id, metrics, int(step))
            if logged is None:
                lines.append(Note(f"The MLflow store does not hold the {what} `{run_id}`."))
            else:
                done = f"logged {', '.join(logged)}" if logged else "already recorded there"
                lines.append(f"MLflow, {what} `{run_id}`: {done}.")
    except Exception as e:  # a server down or refusing: the report is written all the same
        why = (
            str(e) if isinstance(e, CnnopsError) else tracking.refusal(e) or tracking.first_line(e)
        )
        lines.append(Note(f"Not logged to MLflow: {why}"))
    return lines


# --- 7. what the network learned ------------------------------------------------------------------


def insight_section(config: Config) -> Section:
    folder, title = config.paths.reports / "insight", "What the network learned"
    where = f"`{folder.as_posix()}/`"
    if not folder.is_dir():
        return Section(
            "insight", title, [NotRun(f"{where} is absent; the evaluate stage draws it.")]
        )
    found = sorted(p for p in folder.rglob("*.png") if p.is_file())
    if not found:
        return Section("insight", title, [Note(f"{where} holds no PNG yet.")])
    names = [p.relative_to(folder).with_suffix("").as_posix() for p in found]
    return Section(
        "insight", title, [Figure(p, caption(n)) for p, n in zip(found, names, strict=True)]
    )
