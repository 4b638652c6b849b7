"""Whether an MLflow tracking server answers, asked in seconds before any work (training, ``export --mlflow``):
MLflow's own client retries a refused connection for minutes and then names another cause. Light: no
Lightning, no MLflow import."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse


class TrackingUnavailableError(RuntimeError):
    """The tracking store/server cannot be used; raised before training starts."""


#: the database dialects MLflow's SQL store takes
DATABASES = ("postgresql", "mysql", "mssql")
#: the URI schemes of the stores MLflow's client opens ("": a folder, MLflow's file store)
STORE_SCHEMES = ("", "file", "sqlite", "http", "https", "databricks", "databricks-uc", "uc", *DATABASES)

TRAINING_ADVICE = (
    "Start the server, fix logger.tracking_uri / MLFLOW_TRACKING_URI, or train without tracking: logger=none"
)


def check_reachable(uri: str, timeout_s: float, advice: str = TRAINING_ADVICE) -> None:
    """Fail fast when an HTTP tracking server does not answer; make sure a local store's folder exists.

    Any HTTP answer counts as reachable (an auth proxy may answer 401 on /health); only connection
    errors and timeouts mean the server is not there.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]  # a database driver may follow its dialect: postgresql+psycopg2
    if scheme not in _store_schemes() and len(scheme) > 1:  # one letter: a Windows drive, C:/mlruns
        raise TrackingUnavailableError(
            f"MLflow has no tracking store for {uri} (scheme {parsed.scheme!r}); expected sqlite:///PATH.db, "
            f"http(s)://HOST:PORT of an mlflow server, or a database URI ({', '.join(DATABASES)}). {advice}"
        )
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                resp.read(64)
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError) or isinstance(exc, ssl.SSLError):
                return  # it answered: its certificate is MLflow's client's business (REQUESTS_CA_BUNDLE etc.)
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} cannot be reached ({reason}; waited {timeout_s:g} s for {url}). {advice}"
            ) from None
    elif parsed.scheme == "sqlite":
        db = sqlite_database(uri)
        if db is not None:
            _make_folder(db.parent, uri, advice)
    elif parsed.scheme in ("", "file") or len(parsed.scheme) == 1:
        _make_folder(Path(parsed.path if parsed.scheme == "file" else uri).expanduser(), uri, advice)


def _make_folder(folder: Path, uri: str, advice: str) -> None:
    """A local store's folder, made before the run; a failure says which store and which folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker is not None else exc.strerror or str(exc)
        raise TrackingUnavailableError(
            f"MLflow store {uri}: its folder {folder} cannot be made ({why}). {advice}"
        ) from None


def _store_schemes() -> set[str]:
    """MLflow's own store schemes and those of installed MLflow plugins (``mlflow.tracking_store`` entry points)."""
    from importlib.metadata import entry_points

    return {*STORE_SCHEMES, *(ep.name for ep in entry_points(group="mlflow.tracking_store"))}


def sqlite_database(uri: str) -> Path | None:
    """The database file of a local ``sqlite:///`` store (relative to the working folder, as SQLAlchemy reads
    it; ``sqlite:////abs`` is absolute), or None for any other URI or an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(db) if db and db != ":memory:" else None  # no ~ expansion: SQLAlchemy does none either


def local_artifact_root(uri: str) -> str | None:
    """Where a new experiment of a local SQLite store keeps its artifacts: ``mlruns/`` beside the database,
    so a store is one folder wherever the command runs (MLflow's own default is ``./mlruns`` of the working
    folder). None for servers and other stores, which choose their own."""
    db = sqlite_database(uri)
    return (db.parent.absolute() / "mlruns").as_uri() if db is not None else None
