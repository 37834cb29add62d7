"""The model registry: register the best candidate, gate promotion with aliases, load and serve.

Aliases, not the deprecated stages: `challenger` marks the newest registered version, `champion`
the one in production. Every alias move leaves tags on the versions saying who, why and when.
This package and `cnnops.tracking` are the only code that talks to MLflow.
"""

from cnnops.registry.gate import decide, export_champion, promote, rollback
from cnnops.registry.model import ImageClassifier, check_images
from cnnops.registry.register import Candidate, find_candidates, pick, register
from cnnops.registry.store import (
    CHALLENGER,
    CHAMPION,
    CHECKPOINT_SHA256,
    ORIGIN_RUN_ID,
    connect,
    load_model,
    require_alias,
    verified_model,
    version_by_alias,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "CHECKPOINT_SHA256",
    "ORIGIN_RUN_ID",
    "Candidate",
    "ImageClassifier",
    "check_images",
    "connect",
    "decide",
    "export_champion",
    "find_candidates",
    "load_model",
    "pick",
    "promote",
    "register",
    "require_alias",
    "rollback",
    "verified_model",
    "version_by_alias",
]
