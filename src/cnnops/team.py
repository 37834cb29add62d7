"""Team mode: an authenticated MLflow server on PostgreSQL, and credentials that never leak.

Secrets come from the environment only: MLflow's own MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD for clients, MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD
for the server's first start, and libpq's PGPASSWORD or pgpass file for PostgreSQL. A URL that
carries a password is refused where it would be written down (params.yaml, a command line), and
any URL that is shown is shown with its password masked (`mask`).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cnnops.errors import ConfigError

_PASSWORD = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@", re.I
)


def mask(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return bool(_PASSWORD.search(url))


def refuse_password(key: str, url: str | None, where: str = "params.yaml") -> None:
    """A ConfigError when `url` carries a password: it would be stored in `where`."""
    if url and has_password(url):
        raise ConfigError(
            f"{key} = {mask(url)!r}: holds a password, which {where} would keep in the open; "
            "leave it out of the URL and set PGPASSWORD or a pgpass file (PostgreSQL), "
            "MLFLOW_TRACKING_PASSWORD (MLflow) in the environment"
        )


def driver_url(url: str) -> str:
    """`postgresql://` means psycopg 3 to SQLAlchemy 2.1; use psycopg2 when psycopg is absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


AUTH_INI = """[mlflow]
default_permission = {permission}
database_uri = {database}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
grant_default_workspace_access = false
"""


def server_command(backend: str, artifacts: str, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
    ]


def serve(
    backend: str,
    artifacts: str,
    auth_database: str,
    host: str = "127.0.0.1",
    port: int = 5000,
    default_permission: str = "READ",
) -> int:
    """Run an `mlflow server` with basic auth until it stops; returns its exit status.

    Every user may read (`default_permission`); who creates an experiment or a registered model
    manages it, and the admin grants the rest. The admin account is created on the first
    start from MLFLOW_AUTH_ADMIN_USERNAME (default admin) and MLFLOW_AUTH_ADMIN_PASSWORD."""
    for key, url in (("--backend-store-uri", backend), ("--auth-database-uri", auth_database)):
        refuse_password(key, url, "the command line (and every process listing)")
    if not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise ConfigError(
            "MLFLOW_AUTH_ADMIN_PASSWORD is not set: the server's first start creates the admin "
            "account with it (and MLFLOW_AUTH_ADMIN_USERNAME, default admin)"
        )
    env = dict(os.environ)
    env.setdefault("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    # The key of the UI's CSRF tokens: one per server start unless the team shares one.
    env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
    with tempfile.TemporaryDirectory(prefix="cnnops-server-") as tmp:
        ini = Path(tmp) / "basic_auth.ini"
        database = driver_url(auth_database)
        ini.write_text(AUTH_INI.format(permission=default_permission, database=database))
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        command = server_command(driver_url(backend), artifacts, host, port)
        return subprocess.call(command, env=env)
