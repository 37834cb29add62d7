"""Connecting to the registry and resolving aliases; every failure names what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnops.errors import RegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from cnnops.config import Mlflow

CHALLENGER, CHAMPION = "challenger", "champion"
# Model-version tags written by `cnnops register`.
CHECKPOINT_SHA256 = "checkpoint.sha256"  # of the registered checkpoint; checked before every use
ORIGIN_RUN_ID = "cnnops.origin_run_id"  # the run that trained it, maybe in another store


def connect(cfg: Mlflow) -> MlflowClient:
    """A client on the configured registry, once it has answered (fails fast, no retries)."""
    from cnnops import tracking
    from cnnops.team import mask

    uri = tracking.tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        _check_health(uri)
    try:
        client = tracking.client(cfg)
        client.search_registered_models(max_results=1)
    except Exception as e:  # any backend failure here means: not usable as a registry
        raise RegistryError(
            mask(f"model registry at {uri} is unusable: {_first_line(e)}")
        ) from None
    return client


def _check_health(uri: str) -> None:
    import urllib.request

    from cnnops.team import mask

    # MLflow's REST client retries for minutes; one short probe gives the user an answer now.
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
            response.read()
    except OSError as e:
        raise RegistryError(
            f"model registry at {mask(uri)} is unreachable ({mask(str(e))}); start the MLflow "
            "server or point mlflow.tracking_uri / MLFLOW_TRACKING_URI at a running one"
        ) from None


def _first_line(e: Exception) -> str:
    text = str(getattr(e, "message", e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def require_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    """The version `name@alias`, or a RegistryError naming whichever of the two is missing."""
    from mlflow.exceptions import MlflowException

    found = version_by_alias(client, name, alias)
    if found is not None:
        return found
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(
            f"no registered model named {name!r} (registry.model_name); run `cnnops register` first"
        ) from None
    raise RegistryError(
        f"registered model {name!r} has no @{alias} alias; "
        f"run `cnnops {'register' if alias == CHALLENGER else 'promote'}` first"
    )


def load_model(client: MlflowClient, name: str, alias: str) -> tuple[Any, ModelVersion]:
    """The pyfunc model behind `models:/name@alias` and the version it resolved to, loaded only
    once its checkpoint matches the SHA-256 recorded when it was registered."""
    import mlflow.pyfunc

    version = require_alias(client, name, alias)
    return mlflow.pyfunc.load_model(str(verified_model(client, name, version))), version


def verified_model(client: MlflowClient, name: str, version: ModelVersion) -> Path:
    """The local folder of `version`'s model, its checkpoint checked against the version's
    `checkpoint.sha256` tag: a missing tag, a swapped or a corrupted file is a RegistryError."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    from cnnops.checkpoints import sha256_file
    from cnnops.tracking import scoped

    where = f"{name} version {version.version}"
    expected = version.tags.get(CHECKPOINT_SHA256)
    if not expected:
        raise RegistryError(
            f"{where} has no {CHECKPOINT_SHA256} tag, so its checkpoint cannot be verified; "
            "register it again with `cnnops register`"
        )
    # MLflow resolves a models:/ URI with the process-wide registry URI, whatever URI it is
    # given: scoped to the project's store (cnnops's clients use one URI for runs and registry).
    with scoped(client.tracking_uri):
        local = Path(download_artifacts(artifact_uri=f"models:/{name}/{version.version}"))
    try:
        relative = Model.load(local).flavors["python_function"]["artifacts"]["checkpoint"]["path"]
    except Exception:  # no MLmodel, or not ours: either way there is no checkpoint to trust
        raise RegistryError(
            f"{where} is not a cnnops model: it has no checkpoint artifact"
        ) from None
    checkpoint = local / relative
    found = sha256_file(checkpoint) if checkpoint.is_file() else None
    if found != expected:
        source = client.get_model_version_download_uri(name, version.version)
        state = f"has sha256 {found}" if found else "is missing"
        raise RegistryError(
            f"{where}: checkpoint {source.rstrip('/')}/{relative} {state}, expected {expected} "
            "(recorded at registration); it was swapped or corrupted, so it is not used: "
            "restore it or register the model again"
        )
    return local


def set_tags(client: MlflowClient, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
