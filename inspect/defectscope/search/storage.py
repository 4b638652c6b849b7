"""The study's database: opened once per command, with one line for every way it cannot be (a missing driver,
a bad URL, another program's SQLite file)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from .errors import SearchConfigError
from .settings import SearchSettings

#: what two workers opening one new SQLite file at once may see while the other creates the tables
RACES = ("locked", "UNIQUE constraint failed", "already exists")


def redact(url: str) -> str:
    """A database URL without its password, for messages and tags."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__


def _sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite`` URL opens, read as SQLAlchemy and SQLite read it (``file:NAME?...`` with
    ``uri=true`` included); None for memory or a URL SQLAlchemy cannot read (open_storage says so)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return None
    name = parsed.database or ""
    if str(parsed.query.get("uri", "")).lower() == "true" and name.startswith("file:"):
        name = name.removeprefix("file:").split("?", 1)[0].split("#", 1)[0]
    return Path(name) if name and name != ":memory:" else None


def _is_optuna_file(db: Any, tables: set[str]) -> bool:
    """Optuna's schema: its version table, or (a worker creating the file this instant commits it first) a
    ``studies`` table with Optuna's columns. A shared name alone (``trials``) is not enough."""
    if "version_info" in tables:
        return True
    if "studies" not in tables:
        return False
    columns = {row[1] for row in db.execute("PRAGMA table_info(studies)")}
    return {"study_id", "study_name"} <= columns


def check_sqlite_owner(url: str) -> None:
    """Refuse an existing SQLite file that holds another program's tables (``sqlite:///mlflow.db``, one
    letter from ``search.db``): Optuna would add its tables to it and only then fail on the schema."""
    import sqlite3
    from contextlib import closing

    path = _sqlite_path(url)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables or _is_optuna_file(db, tables):
                return
    except sqlite3.Error:
        return  # not a database, or unreadable: open_storage says so in its own words
    names = sorted(tables)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise SearchConfigError(
        f"search.storage: {path} is another program's database (tables {shown}), not an Optuna study "
        "store; writing the study into it would change it: name a file of its own, e.g. sqlite:///search.db"
    )


def open_storage(s: SearchSettings) -> RDBStorage:
    """The study's database (SQLite file by default, any SQLAlchemy URL for several workers)."""
    sqlite = s.storage.startswith("sqlite")
    if sqlite:
        check_sqlite_owner(s.storage)
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    last: Exception | None = None
    for attempt in range(5):  # two workers creating one new SQLite file race on its tables
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    s.storage,
                    engine_kwargs=engine,
                    heartbeat_interval=s.heartbeat_s,
                    grace_period=s.grace_s,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=s.retry_interrupted
                    )
                    if s.retry_interrupted
                    else None,
                )
        except Exception as exc:  # SQLAlchemy, a missing driver, a bad URL: all mean "cannot open"
            last = exc
            if not sqlite or not any(m in str(exc) for m in RACES):
                break
            time.sleep(1.0 + attempt)
    text = first_line(last)
    if last is not None and last.__cause__ is not None:  # e.g. the missing driver behind an ImportError
        text += f" ({first_line(last.__cause__)})"
    raise SearchConfigError(f"search.storage: cannot open {redact(s.storage)}: {text}") from None
