"""The `cnnops` command line: one subcommand per DVC stage. Heavy imports happen inside commands."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cnnops.errors import CnnopsError

if TYPE_CHECKING:
    from cnnops.config import Config
    from cnnops.tracker_process import TrackerProcess

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reproducible CNN pipelines: fetch → prepare → train → tune → register → evaluate → promote.",
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file to read.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-S", help="Override a value: KEY=VALUE (repeatable).")
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", "-w", min=1, help="Worker processes on this machine (default: tune.workers)."
    ),
]
F = TypeVar("F", bound=Callable[..., Any])


def clear_errors(fn: F) -> F:
    """Turn a user-fixable error into one line on stderr and exit status 2, and SIGTERM/SIGINT
    into one line saying how to resume and exit status 143/130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cnnops import runs

        name = f"cnnops {fn.__name__.replace('_', '-')}"
        try:
            with runs.interruptible():
                return fn(*args, **kwargs)
        except CnnopsError as e:
            typer.echo(f"{name}: error: {e}", err=True)
            raise typer.Exit(2) from None
        except runs.Interrupted as e:
            detail = f"; {e.detail}" if e.detail else ""
            typer.echo(f"{name}: interrupted by {e}{detail}", err=True)
            raise typer.Exit(e.exit_code) from None
        except Exception as e:  # an MLflow server's 401 or 403 is the user's to fix
            from cnnops.tracking import refusal

            message = refusal(e)
            if message is None:
                raise
            typer.echo(f"{name}: error: {message}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _config(params: Path, overrides: list[str] | None, study: bool = False) -> Any:
    """params as the stages read them; `study`: also refuse tuning a lever the model lacks."""
    from cnnops.config import load_config
    from cnnops.models import check_architecture, check_study

    return load_config(params, overrides, check=check_study if study else check_architecture)


def _print(data: dict[str, Any]) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@app.command("show-config")
@clear_errors
def show_config(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Validate params.yaml (with overrides) and print the resolved config."""
    from cnnops.config import dump_config

    typer.echo(dump_config(_config(params, set_)), nl=False)


@app.command()
@clear_errors
def fetch(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Fetch the dataset named by fetch.source into paths.raw, checksum-verified."""
    from cnnops.data.sources import fetch as run

    config = _config(params, set_)
    run(config.fetch, config.paths.raw)
    typer.echo(f"fetched {config.fetch.source} into {config.paths.raw}")


@app.command()
@clear_errors
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Split into train/val/test uint8 arrays with statistics (reports/data.json)."""
    from cnnops.data.prepare import prepare as run

    config = _config(params, set_)
    stats = run(config, config.paths.raw, config.paths.prepared, config.paths.reports / "data.json")
    typer.echo(json.dumps({k: v["total"] for k, v in stats["splits"].items()}))


@contextmanager
def _mlflow_process(config: Config, wanted: bool = True) -> Iterator[TrackerProcess | None]:
    """A process that warms MLflow up (import, store) while the stage imports torch, for the
    stage's run; None where not `wanted` or MLflow is already imported here. Let go after."""
    if not wanted or "mlflow" in sys.modules:
        yield None
        return
    from cnnops.tracker_process import TrackerProcess

    mlflow = TrackerProcess(config.mlflow)
    try:
        yield mlflow
    finally:
        mlflow.shutdown()


@app.command()
@clear_errors
def train(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train the CNN; checkpoints to paths.models/train, metrics to reports/train.json."""
    from cnnops.runs import rank_zero
    from cnnops.timings import phase

    with phase("config"):
        config = _config(params, set_)
    if rank_zero():  # a dead tracking server: one line now, before the heavy imports
        from cnnops.tracking import check_reachable

        check_reachable(config.mlflow)
    with _mlflow_process(config, rank_zero()) as mlflow:
        with phase("import"):
            from cnnops.train import train_stage

        metrics = train_stage(config, mlflow)
    if rank_zero():  # under DDP every rank runs this command; one answer is enough
        _print(metrics)


NOpt = Annotated[int, typer.Option("--n", min=1, max=64, help="Training images, one per row.")]
DrawsOpt = Annotated[int, typer.Option("--draws", min=1, max=32, help="Augmented draws per image.")]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="The PNG to write; paths.reports/augment_preview.png when unset."),
]


@app.command("augment-preview")
@clear_errors
def augment_preview(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    n: NOpt = 8,
    draws: DrawsOpt = 8,
    out: OutOpt = None,
) -> None:
    """Draw a PNG grid of training images with augmented draws of each: what the model sees."""
    from cnnops.augment import write_preview
    from cnnops.data import prepare

    config = _config(params, set_)
    x = prepare.load(config.paths.prepared, mmap=True).x["train"]
    path = out or config.paths.reports / "augment_preview.png"
    typer.echo(write_preview(config.augment, x, path, n, draws, seed=config.train.seed))


@app.command()
@clear_errors
def weights(
    name: Annotated[
        str,
        typer.Argument(
            help="resnet18, resnet50, vgg16, inception_v3, efficientnet_b0 or mobilenet_v2."
        ),
    ],
    dir_: Annotated[Path, typer.Option("--dir", help="The folder to write into.")] = Path(
        "weights"
    ),
    mirror: Annotated[
        str | None,
        typer.Option(
            help="A folder or file:// URL holding torchvision's files under their own names, "
            "read instead of download.pytorch.org."
        ),
    ] = None,
) -> None:
    """Fetch torchvision's ImageNet weights for NAME, verified, and print the params.yaml lines."""
    from cnnops.weights import fetch_weights

    got = fetch_weights(name, dir_, mirror)
    path = got.path.as_posix()
    done = f"fetched from {got.source}" if got.source else "already there and verified, unchanged"
    typer.echo(f"{path}: {done}")
    typer.echo(f"sha256: {got.sha256}")
    typer.echo("in params.yaml:")
    typer.echo(f"model:\n  name: {name}\n  weights: {path}\n  weights_sha256: {got.sha256}")
    typer.echo(f"track it with DVC: dvc add {path}")


@app.command("demo-images")
@clear_errors
def demo_images(
    folder: Annotated[Path, typer.Argument(help="The image folder to create.")],
    n: Annotated[int, typer.Option("--n", min=10, max=1_000_000, help="Images.")] = 1000,
    side: Annotated[int, typer.Option("--side", min=8, max=1024, help="Pixels a side.")] = 96,
) -> None:
    """Write a photo-like image folder (digits on random colours, one folder per class) to try
    fine-tuning on: point fetch.url at it."""
    from cnnops.data.demo import colour_digits
    from cnnops.errors import DataError

    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder}: not empty; name a new folder (nothing was written)")
    colour_digits(folder, n, side)
    typer.echo(f"{folder}: {n} images in 10 class folders, {side}x{side} RGB JPEG")


@app.command()
@clear_errors
def tune(
    params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, workers: WorkersOpt = None
) -> None:
    """Optuna search over the regularization levers; best params and checkpoint to paths.*/tune."""
    from cnnops.timings import phase
    from cnnops.tracking import check_reachable

    with phase("config"):
        config = _config(params, set_, study=True)
    check_reachable(config.mlflow)  # a dead tracking server: one line now, not after trials
    with _mlflow_process(config) as mlflow:  # the study's run
        from cnnops.tune_stage import tune_stage

        summary = tune_stage(config, workers, mlflow)
    _print(summary)


@app.command()
@clear_errors
def evaluate(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Score models:/<name>@challenger (and @champion) on the test split; reports/eval*."""
    from cnnops.evaluate import evaluate_stage

    result = evaluate_stage(_config(params, set_))
    _print(result)


@app.command()
@clear_errors
def register(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Register the best candidate checkpoint as a new model version with alias challenger."""
    from cnnops.registry import register as run

    _print(run(_config(params, set_)))


@app.command()
@clear_errors
def promote(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Move alias champion to the challenger if it beats the champion by registry.min_delta."""
    from cnnops.registry import promote as run

    _print(run(_config(params, set_)))


@app.command()
@clear_errors
def rollback(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Move alias champion back to the version it replaced."""
    from cnnops.registry import rollback as run

    _print(run(_config(params, set_)))


@app.command()
@clear_errors
def report(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="The HTML file to write (the .md beside it); paths.reports/report.html."
        ),
    ] = None,
) -> None:
    """One self-contained HTML report, and its Markdown twin, of what the pipeline wrote: data,
    curves with a fit verdict, evaluation, study, champion vs challenger, cost, insight."""
    from cnnops.report_html import write_report

    config = _config(params, set_)
    _print(write_report(config, out or config.paths.reports / "report.html"))


@app.command()
@clear_errors
def serve(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    alias: Annotated[str, typer.Option(help="The registry alias to serve.")] = "champion",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5001,
) -> None:
    """Serve models:/<registry.model_name>@<alias> with MLflow's scoring server (raw uint8 in)."""
    from cnnops.registry.serve import serve as run

    run(_config(params, set_), alias, host, port)


@app.command()
@clear_errors
def ui(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
) -> None:
    """Start MLflow's UI on the project's tracking store and print the experiment's page: runs,
    curves, per-epoch images, system metrics, the registry. A tracking server is its own UI:
    only its page is printed."""
    import os

    from cnnops.team import mask
    from cnnops.tracking import check_reachable, tracking_uri, ui_command, ui_url

    cfg = _config(params, set_).mlflow
    command = ui_command(cfg, host, port)
    if command is None:  # a tracking server: its UI is at its URL
        check_reachable(cfg)
        typer.echo(f"MLflow UI: {mask(ui_url(cfg, tracking_uri(cfg)))}")
        return
    store, page = mask(tracking_uri(cfg)), ui_url(cfg, f"http://{host}:{port}")
    typer.echo(f"MLflow UI on {store}: {page}")
    os.execv(command[0], command)  # the UI's own process from here: Ctrl-C and signals reach it


@app.command()
@clear_errors
def dashboard(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
) -> None:
    """Start optuna-dashboard on the study storage (tune.storage): trials, history, importances."""
    from optuna_dashboard import run_server

    from cnnops.errors import DataError
    from cnnops.studies import open_storage, storage_exists, storage_url
    from cnnops.team import mask

    url = storage_url(_config(params, set_))
    if not storage_exists(url):
        raise DataError(f"{url}: no study yet (tune.storage); run `cnnops tune` first")
    typer.echo(f"optuna-dashboard on {mask(url)}: http://{host}:{port}")
    run_server(open_storage(url, on_stale=lambda *_: None), host=host, port=port)


@app.command()
@clear_errors
def server(
    backend_store_uri: Annotated[
        str, typer.Option(help="Runs and the registry, e.g. postgresql://mlflow@db:5432/mlflow.")
    ],
    artifacts_destination: Annotated[
        str, typer.Option(help="Where artifacts go: a folder, s3://..., gs://...")
    ],
    auth_database_uri: Annotated[
        str, typer.Option(help="Users and permissions, e.g. postgresql://mlflow@db:5432/auth.")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    default_permission: Annotated[
        str,
        typer.Option(help="What every user may do to what others created: READ or NO_PERMISSIONS."),
    ] = "READ",
) -> None:
    """Team mode: an MLflow server with basic auth (users, permissions) on PostgreSQL.

    Passwords come from the environment only: PGPASSWORD or a pgpass file for the databases,
    MLFLOW_AUTH_ADMIN_PASSWORD (and MLFLOW_AUTH_ADMIN_USERNAME) for the admin's first start."""
    from cnnops.team import serve as run

    raise typer.Exit(
        run(
            backend_store_uri,
            artifacts_destination,
            auth_database_uri,
            host,
            port,
            default_permission,
        )
    )


@app.command()
@clear_errors
def retrain(
    ctx: typer.Context,
    pipeline: Annotated[
        Path,
        typer.Option(
            envvar="CNNOPS_PIPELINE",
            help="The DVC project to retrain: . or a variant's folder, e.g. pipelines/mnist.",
        ),
    ] = Path("."),
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-S",
            envvar="CNNOPS_SET",
            help="Override a value: KEY=VALUE (repeatable; in CNNOPS_SET one a line). Validated "
            "like `cnnops show-config --set`, then written into the pipeline's params.yaml.",
        ),
    ] = None,
    base: Annotated[
        str,
        typer.Option(envvar="CNNOPS_BASE", help="The git ref the params and metrics diffs use."),
    ] = "HEAD",
) -> None:
    """Retrain what changed: dvc pull (when a remote is set), dvc repro, the promotion gate
    against @champion, and a report in reports/retrain.md and reports/retrain.json.

    Exit status:
    0: the challenger was promoted, or nothing changed (nothing retrained or registered);
    3: a new challenger lost the gate, the champion stays;
    2: bad input (--set, --pipeline or --base), nothing written;
    1: dvc pull or dvc repro failed (their output says why).
    """
    from cnnops.retrain import PipelineFailed, env_overrides
    from cnnops.retrain import retrain as run

    overrides = list(set_ or [])
    source = ctx.get_parameter_source("set_")
    if source is not None and source.name == "ENVIRONMENT":
        overrides = env_overrides()  # one KEY=VALUE a line: values may hold spaces
    try:
        outcome = run(pipeline, overrides, base)
    except PipelineFailed as e:
        typer.echo(f"cnnops retrain: {e}", err=True)
        raise typer.Exit(1) from None
    report = outcome.report
    _print(
        {
            "verdict": report["verdict"],
            "stages_ran": report["stages_ran"],
            "champion": report["champion"],
            "report": str(outcome.markdown),
            "exit_code": outcome.exit_code,
        }
    )
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)
