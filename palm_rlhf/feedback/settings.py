"""Django settings for the feedback app, read from the environment so one command can start it.

- PALM_RLHF_FEEDBACK_DIR: folder for the SQLite database and the generated secret key
  (default ./feedback_data).
- DATABASE_URL: any database Django supports, e.g. postgres://user:pw@host:5432/name;
  default sqlite:///<PALM_RLHF_FEEDBACK_DIR>/db.sqlite3.
- PALM_RLHF_FEEDBACK_SECRET_KEY: the secret key; otherwise one is made once and kept in the folder.
- PALM_RLHF_FEEDBACK_HOSTS: comma-separated host names the server answers to.
- PALM_RLHF_FEEDBACK_ORIGIN: the public address raters open, e.g. https://feedback.example.org
  (`serve --origin`): trusted for CSRF, its host allowed; when https, cookies are Secure and HSTS is on.
- PALM_RLHF_FEEDBACK_PROXY=1 (`serve --behind-proxy`): a reverse proxy that terminates TLS sits in
  front and sets X-Forwarded-Proto and X-Forwarded-For; never set it when clients can reach the
  server directly, as they could then claim to be on https or come from any address.
- PALM_RLHF_FEEDBACK_LOGIN_SLOTS: how many logins may hash a password at once (default half the cores).
- PALM_RLHF_FEEDBACK_DEBUG=1: Django's debug pages, never on a server others can reach.
"""
import os
import secrets
from pathlib import Path
from urllib.parse import unquote, urlsplit

APP_DIR = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("PALM_RLHF_FEEDBACK_DIR", "feedback_data")).resolve()

ENGINES = {
    "sqlite": "django.db.backends.sqlite3",
    "postgres": "django.db.backends.postgresql",
    "postgresql": "django.db.backends.postgresql",
    "mysql": "django.db.backends.mysql",
    "oracle": "django.db.backends.oracle",
}

# Many raters write at once. WAL lets readers run beside the writer; IMMEDIATE makes every
# transaction take the write lock when it begins, so two transactions never deadlock upgrading a
# read lock (which SQLite answers with an instant "database is locked"); they queue for `timeout`.
# synchronous=NORMAL is safe in WAL mode against a crash of the process, not of the machine.
SQLITE_OPTIONS = {
    "transaction_mode": "IMMEDIATE",
    "timeout": 30,
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
}


def database_from_url(url: str) -> dict:
    """A Django DATABASES entry from a URL: sqlite:///relative.db, sqlite:////abs.db, postgres://..."""
    parts = urlsplit(url)
    if parts.scheme not in ENGINES:
        raise ValueError(f"DATABASE_URL scheme {parts.scheme!r} is not one of {sorted(ENGINES)}")
    if parts.scheme == "sqlite":
        return {"ENGINE": ENGINES["sqlite"], "NAME": unquote(parts.path[1:]), "OPTIONS": dict(SQLITE_OPTIONS)}
    return {
        "ENGINE": ENGINES[parts.scheme],
        "NAME": unquote(parts.path.lstrip("/")),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


def whole_number(name: str, default: int, least: int) -> int:
    """A count from the environment; one line when it is not a whole number of at least `least`."""
    text = os.environ.get(name, str(default))
    if not (text.isascii() and text.isdigit() and len(text) < 10 and int(text) >= least):
        raise ValueError(f"{name} must be a whole number of at least {least}, not {text!r}")
    return int(text)


APP_FILES = ("db.sqlite3", "secret_key")  # what makes a folder this app's data folder


def private_folder(path: Path) -> None:
    """The data folder, 0700: it holds the secret key and the database (password hashes, sessions,
    invites). A new or empty folder is made so, and one that is ours already (it holds one of
    APP_FILES); any other is refused with its mode untouched (`--data-dir .` made a project folder 0700)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"the data folder {path} is a file")
    if path.exists() and any(path.iterdir()) and not any((path / name).exists() for name in APP_FILES):
        raise ValueError(f"the data folder {path} holds other files and no {' or '.join(APP_FILES)}: "
                         "give a new or empty folder, or the one the app made before")
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def secret_key() -> str:
    if "PALM_RLHF_FEEDBACK_SECRET_KEY" in os.environ:
        return os.environ["PALM_RLHF_FEEDBACK_SECRET_KEY"]
    # kept on disk so sessions and invite links survive a restart
    path = DATA_DIR / "secret_key"
    if not path.exists():
        private_folder(DATA_DIR)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


def checked_origin(url: str, name: str) -> str:
    """An address raters open: scheme and host, no path (the app is served at the root)."""
    refused = ValueError(f"{name} must look like https://feedback.example.org, not {url!r}")
    parts = urlsplit(url)
    try:
        parts.port  # raises for a port that is not a number or beyond 65535
    except ValueError:
        raise refused from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
        raise refused
    return url


def public_settings(origin: str, behind_proxy: bool, hosts: list[str]) -> dict:
    """Settings for serving at a public origin, optionally behind a TLS-terminating reverse proxy."""
    result = {"FEEDBACK_ORIGIN": "", "FEEDBACK_BEHIND_PROXY": behind_proxy, "ALLOWED_HOSTS": list(hosts)}
    if behind_proxy:  # request.is_secure() then follows the proxy's scheme, as the CSRF origin check needs
        result["SECURE_PROXY_SSL_HEADER"] = ("HTTP_X_FORWARDED_PROTO", "https")
    if origin:
        parts = urlsplit(checked_origin(origin, "the public origin"))
        result["FEEDBACK_ORIGIN"] = f"{parts.scheme}://{parts.netloc}"
        result["CSRF_TRUSTED_ORIGINS"] = [result["FEEDBACK_ORIGIN"]]
        result["ALLOWED_HOSTS"].append(parts.hostname)
        if parts.scheme == "https":
            result.update(SESSION_COOKIE_SECURE=True, CSRF_COOKIE_SECURE=True, SECURE_HSTS_SECONDS=365 * 24 * 3600)
    return result


SECRET_KEY = secret_key()
DEBUG = os.environ.get("PALM_RLHF_FEEDBACK_DEBUG") == "1"
globals().update(public_settings(
    os.environ.get("PALM_RLHF_FEEDBACK_ORIGIN", ""),
    behind_proxy=os.environ.get("PALM_RLHF_FEEDBACK_PROXY") == "1",
    hosts=os.environ.get("PALM_RLHF_FEEDBACK_HOSTS", "localhost,127.0.0.1,[::1]").split(","),
))

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "palm_rlhf.feedback.apps.FeedbackConfig",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "palm_rlhf.feedback.urls"
WSGI_APPLICATION = "palm_rlhf.feedback.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {"default": database_from_url(os.environ.get("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": f"django.contrib.auth.password_validation.{name}"}
    for name in ("UserAttributeSimilarityValidator", "MinimumLengthValidator",
                 "CommonPasswordValidator", "NumericPasswordValidator")
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

STATIC_URL = "static/"
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en"

# The login throttle (see throttle.py). Hard limits: failures from one address, and of one account
# from one address, within a window of seconds from the first. An account's own failures only
# delay untrusted clients, from the Nth on, by a doubling delay of at most MAX_DELAY seconds; they
# and an address's failures are remembered this long after the last one.
FEEDBACK_ADDRESS_FAILURES = 50
FEEDBACK_PAIR_FAILURES = 10
FEEDBACK_LOGIN_WINDOW = 15 * 60
FEEDBACK_ACCOUNT_FAILURES = 5
FEEDBACK_ACCOUNT_MAX_DELAY = 300
FEEDBACK_FAILURE_MEMORY = 24 * 3600
FEEDBACK_KNOWN_ADDRESS_DAYS = 30
# passwords hashed at once; clients served first may queue for a slot, this many at most, this long
FEEDBACK_LOGIN_SLOTS = whole_number("PALM_RLHF_FEEDBACK_LOGIN_SLOTS", max(1, (os.cpu_count() or 2) // 2), least=1)
FEEDBACK_LOGIN_QUEUE = 2 * FEEDBACK_LOGIN_SLOTS
FEEDBACK_LOGIN_WAIT = 5

# An item handed to a rater is held for them this long; after that an unanswered hand-out no
# longer counts against the item's overlap, so a rater who walks away does not block it forever.
FEEDBACK_LEASE_SECONDS = whole_number("PALM_RLHF_FEEDBACK_LEASE_SECONDS", 30 * 60, least=0)
