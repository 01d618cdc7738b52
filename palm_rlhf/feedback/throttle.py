"""Login throttling: failed logins counted per account and per client address, refused before hashing.

Checking a password is slow on purpose (Django's PBKDF2 takes about half a second of CPU), so a
stream of wrong passwords both guesses at accounts and starves the server of CPU and threads. A
login is refused, with a clear message and status 429, before any password is hashed when:
1. its account had FEEDBACK_LOGIN_FAILURES failed logins in the current window of
   FEEDBACK_LOGIN_WINDOW seconds (the window starts at the first failure, so the real user is kept
   out for at most one window, and refused attempts do not extend it);
2. its client address had FEEDBACK_ADDRESS_FAILURES failed logins in the window (one client trying
   many accounts); behind a declared proxy the address is the one the proxy appended to
   X-Forwarded-For;
3. FEEDBACK_LOGIN_SLOTS logins are being checked already: it is refused at once rather than queued,
   so hashing never holds more than that many server threads and cores, and raters' answers stay fast.
Counts live in Django's cache: in the server's memory by default, forgotten on a restart. The
window is kept with the count and judged by now() (not by the cache's expiry), so tests can move the clock.
"""
import hashlib
import math
import threading
import time

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.core.exceptions import ValidationError

SLOTS = threading.BoundedSemaphore(settings.FEEDBACK_LOGIN_SLOTS)
COUNTING = threading.Lock()


def client_address(request) -> str:
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if settings.FEEDBACK_BEHIND_PROXY and forwarded:
        return forwarded.split(",")[-1].strip()  # appended by our proxy; earlier entries are the client's word
    return request.META.get("REMOTE_ADDR", "")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def counters(username: str, address: str) -> list[tuple[str, int]]:
    """(cache key, limit) for the account and the address; hashed, so any text makes a valid key."""
    return [(f"login-failures:account:{digest(username)}", settings.FEEDBACK_LOGIN_FAILURES),
            (f"login-failures:address:{digest(address)}", settings.FEEDBACK_ADDRESS_FAILURES)]


def now() -> float:
    return time.time()


def failures(key: str) -> tuple[int, float]:
    """(failures, when the window ends) for one key; (0, now) once its window is over."""
    count, ends = cache.get(key, (0, 0.0))
    return (count, ends) if ends > now() else (0, now())


def count_failure(key: str) -> None:
    with COUNTING:  # read and write as one step: several slots may fail at once
        count, ends = failures(key)
        if count == 0:  # the window starts at the first failure
            ends = now() + settings.FEEDBACK_LOGIN_WINDOW
        cache.set(key, (count + 1, ends), timeout=settings.FEEDBACK_LOGIN_WINDOW)


def locked_until(keys: list[tuple[str, int]]) -> float:
    """When the last of the locked counters among `keys` unlocks; 0 when none is locked."""
    until = 0.0
    for key, limit in keys:
        count, ends = failures(key)
        if count >= limit:
            until = max(until, ends)
    return until


THROTTLED = "Too many failed logins for this account or from your address. Try again in %(minutes)s min."
BUSY = "The server is checking other logins right now. Try again in a moment."


class ThrottledLogin:
    """Mixed into a login form, before its AuthenticationForm, so that clean() checks the throttle first."""

    def clean(self):
        keys = counters(self.cleaned_data.get("username") or "", client_address(self.request))
        if until := locked_until(keys):
            minutes = math.ceil((until - now()) / 60)
            raise ValidationError(THROTTLED, code="throttled", params={"minutes": minutes})
        if not SLOTS.acquire(blocking=False):
            raise ValidationError(BUSY, code="busy")
        try:
            cleaned = super().clean()
        except ValidationError as error:
            if error.code == "invalid_login":
                for key, _ in keys:
                    count_failure(key)
            raise
        finally:
            SLOTS.release()
        cache.delete(keys[0][0])  # the account's own failures; the address keeps its count
        return cleaned


class LoginForm(ThrottledLogin, AuthenticationForm):
    pass


class AdminLoginForm(ThrottledLogin, AdminAuthenticationForm):
    pass


def refused(form) -> bool:
    """Whether a login form was turned away by the throttle (the view answers 429)."""
    return any(form.has_error("__all__", code) for code in ("throttled", "busy"))
