"""Where an experiment's Optuna studies live, and what they are called.

- `search.optuna_storage` unset, experiment in a local folder: SQLite in it (`optuna.db`), as always.
- `search.optuna_storage` unset, experiment in object storage: SQLite cannot live there, so it lives on
  the driver's local disk and is copied to the experiment (`optuna.db`) whenever Tune saves its own state
  (so the copy is never older than the searcher state a resume starts from), during and after the
  stage-2 phase, and at exit; `--resume` on any machine starts from that copy.
- `search.optuna_storage: postgresql://...` (any SQLAlchemy URL Optuna takes): a database server that
  every driver reaches and optuna-dashboard can watch. One database holds many experiments, so each
  study is named after its experiment: `<experiment URI>/<phase>` (with SQLite, just `<phase>`).
"""
from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import optuna

from ..config import ConfigError
from ..storage import Location, local_mirror

__all__ = ["Studies"]


class Studies:
    def __init__(self, exp: Location | Path, url: str | None):
        exp = Location(exp)
        self.exp, self.server = exp, url is not None
        self.local: Path | None = None
        if url is not None:
            self.url = url
        elif exp.is_local:
            self.url = f"sqlite:///{exp.local_path / 'optuna.db'}"
        else:
            self.local = local_mirror(exp, "studies") / "optuna.db"
            self.url = f"sqlite:///{self.local}"

    def name(self, phase: str) -> str:
        return f"{self.exp.uri}/{phase}" if self.server else phase

    def phase_of(self, study_name: str) -> str | None:
        """The phase of one of this experiment's studies; None for another experiment's."""
        if not self.server:
            return study_name
        prefix = f"{self.exp.uri}/"
        return study_name[len(prefix):] if study_name.startswith(prefix) else None

    def storage(self) -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(self.url)

    def shown_url(self) -> str:
        """The URL without its password, for printing and summary.json."""
        from sqlalchemy.engine import make_url

        return make_url(self.url).render_as_string(hide_password=True)

    def check(self) -> None:
        """Refuse, in one line, a database server that does not answer (before any trial starts)."""
        if not self.server:
            return
        import sqlalchemy

        try:
            url = sqlalchemy.engine.make_url(self.url)
            args = {"connect_timeout": 5} if url.get_backend_name() in ("postgresql", "mysql") else {}
            engine = sqlalchemy.create_engine(url, connect_args=args)
            with engine.connect():
                pass
            engine.dispose()
        except ImportError as err:
            raise ConfigError(f"search.optuna_storage: {self.shown_url()}: its database driver is not installed "
                              f"({err}; for PostgreSQL: pip install 'psycopg[binary]')") from None
        except (sqlalchemy.exc.SQLAlchemyError, ValueError) as err:  # a bad URL, a server that does not answer
            line = str(getattr(err, "orig", None) or err).strip().splitlines()
            raise ConfigError(f"search.optuna_storage: {self.shown_url()}: the database does not answer "
                              f"({line[0] if line else type(err).__name__})") from None

    def start(self, resume: bool) -> str:
        """Prepare the local copy of a mirrored SQLite study (restored from the experiment on `--resume`);
        return the one line that says where the studies live."""
        if self.server:
            return f"Optuna studies: {self.shown_url()} (studies {self.name('<phase>')})"
        if self.local is None:
            return f"Optuna studies: {self.url}"
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.local.unlink(missing_ok=True)
        kept = self.exp / "optuna.db"
        if resume and kept.is_file():
            kept.download(self.local)
        return (f"Optuna studies: SQLite on this machine ({self.local}), copied to {kept} as the search goes "
                "(set search.optuna_storage to a database URL to keep them in a server)")

    def save(self) -> None:
        """Copy a mirrored SQLite study to the experiment: a consistent snapshot (SQLite's backup API)."""
        if self.local is None or not self.local.is_file():
            return
        with tempfile.TemporaryDirectory() as tmp:
            snapshot = Path(tmp) / "optuna.db"
            source, target = sqlite3.connect(self.local), sqlite3.connect(snapshot)
            try:
                source.backup(target)
            finally:
                source.close()
                target.close()
            (self.exp / "optuna.db").upload(snapshot)
