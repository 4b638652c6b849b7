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


#: tables every Optuna RDB storage has; a SQLite file with tables but none of these is another program's
OPTUNA_TABLES = ("studies", "trials", "version_info")


def check_sqlite_owner(url: str) -> None:
    """Refuse an existing SQLite file that holds another program's tables (``sqlite:///mlflow.db``, one
    letter from ``search.db``): Optuna would add its tables to it and only then fail on the schema."""
    import sqlite3

    from sqlalchemy.engine import make_url

    try:
        name = make_url(url).database
    except Exception:
        return  # a URL SQLAlchemy cannot read: open_storage says so
    path = Path(name) if name and name != ":memory:" else None
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
            tables = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'"))
    except sqlite3.Error:
        return  # not a database, or unreadable: open_storage says so in its own words
    if tables and not set(OPTUNA_TABLES) & set(tables):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
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
