import os
from pathlib import Path

from django.apps import AppConfig


def private_sqlite_file(name: str) -> None:
    """Create an SQLite database file 0600 (or make an existing one so), with its -wal and -shm.

    It holds password hashes, session keys and invite tokens. SQLite gives the -wal and -shm files
    it makes later the database file's own mode, so creating the file 0600 first is enough.
    """
    if name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if file.exists():
            file.chmod(0o600)


class FeedbackConfig(AppConfig):
    name = "palm_rlhf.feedback"
    label = "feedback"
    verbose_name = "Human feedback"

    def ready(self):
        from django.conf import settings

        database = settings.DATABASES["default"]
        if database["ENGINE"] == "django.db.backends.sqlite3":
            private_sqlite_file(str(database["NAME"]))
