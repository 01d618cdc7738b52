"""Login throttling after OWASP's Authentication Cheat Sheet, checked before any password is hashed.

Checking a password is slow on purpose (Django's PBKDF2 takes a fraction of a second of CPU), so a
stream of wrong passwords both guesses at accounts and starves the server of CPU and threads.
1. A client address with FEEDBACK_ADDRESS_FAILURES failed logins in its window (FEEDBACK_LOGIN_WINDOW
   seconds from its first failure) is refused (429) for every account until the window ends.
2. An (account, address) pair with FEEDBACK_PAIR_FAILURES failures in its window is refused for that
   account. A success clears the pair.
3. An account is never locked: anyone could lock out anyone. From its FEEDBACK_ACCOUNT_FAILURES-th
   failure on, each failure doubles a delay (1 s, 2 s, 4 s, ... at most FEEDBACK_ACCOUNT_MAX_DELAY)
   before an untrusted client may try it again. Its count is forgotten FEEDBACK_FAILURE_MEMORY
   seconds after its last failure (longer than a window: the delays must outlast a pair's lock).
4. FEEDBACK_LOGIN_SLOTS passwords are hashed at once. A client served first waits for a slot (up to
   FEEDBACK_LOGIN_WAIT s, at most FEEDBACK_LOGIN_QUEUE of them) and goes before any other; any other
   client is refused at once while the slots are busy or a first client waits. Each refusal for busy
   slots counts toward its address's limit (1) unless the client is known, so a flood that keeps the
   slots busy, even from fresh addresses, locks itself out within a second or so.
Trusted for an account (never delayed by 3, served first by 4): an address with no failed login in
FEEDBACK_FAILURE_MEMORY seconds, or a known one, which logged into this account within
FEEDBACK_KNOWN_ADDRESS_DAYS. A browser already logged in is served first too. Known clients (a known
address, a logged-in browser) are who 4 never charges for a busy refusal.

The counts are LoginCounter rows: nothing evicts them (a cache did, under a flood of new usernames),
each expires on its own, and every thread and process of the server sees the same ones. Behind a
declared proxy the address is the one the proxy appended to X-Forwarded-For. Times come from now(),
so tests can move the clock.
"""
import hashlib
import json
import math
import threading
import time

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.core.exceptions import ValidationError
from django.db import transaction

from .models import LoginCounter

THROTTLED = "Too many failed logins from your address%(account)s. Try again in %(minutes)s min."
DELAYED = ("Too many failed logins for this account. From an address with failed logins, try again in "
           "%(seconds)s s, or log in from an address you have used before.")
BUSY = "The server is checking other logins right now. Try again in a moment."


def now() -> float:
    return time.time()


def client_address(request) -> str:
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if settings.FEEDBACK_BEHIND_PROXY and forwarded:
        return forwarded.split(",")[-1].strip()  # appended by our proxy; earlier entries are the client's word
    return request.META.get("REMOTE_ADDR", "")


def counter_keys(username: str, address: str) -> dict[str, str]:
    """The LoginCounter key of each count a login touches; hashed, so any text makes a key of fixed length."""
    def digest(*parts):
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    return {"address": "address:" + digest(address), "pair": "pair:" + digest(username, address),
            "account": "account:" + digest(username), "known": "known:" + digest(username, address),
            "failed": "failed:" + digest(address)}


def live_counters(keys: dict[str, str]) -> dict[str, LoginCounter]:
    """The unexpired counters among `keys`, by kind; a kind without one has no count."""
    rows = {row.key: row for row in LoginCounter.objects.filter(key__in=keys.values(), expires__gt=now())}
    return {kind: rows[key] for kind, key in keys.items() if key in rows}


def count(counters: dict, kind: str) -> int:
    return counters[kind].count if kind in counters else 0


def trusted(counters: dict) -> bool:
    return "failed" not in counters or "known" in counters


def refusal(counters: dict) -> ValidationError | None:
    """Why this login may not be checked now (rules 1-3), or None."""
    for kind, limit, account in (("address", settings.FEEDBACK_ADDRESS_FAILURES, ""),
                                 ("pair", settings.FEEDBACK_PAIR_FAILURES, " for this account")):
        if count(counters, kind) >= limit:
            minutes = math.ceil((counters[kind].expires - now()) / 60)
            return ValidationError(THROTTLED, code="throttled", params={"account": account, "minutes": minutes})
    wait = counters["account"].wait_until - now() if "account" in counters else 0
    if wait > 0 and not trusted(counters):
        return ValidationError(DELAYED, code="throttled", params={"seconds": math.ceil(wait)})
    return None


def bump(key: str, lifetime: float, sliding: bool = False) -> LoginCounter:
    """Add one to a counter (inside a transaction). It expires `lifetime` seconds after its first
    count, or with `sliding` after its latest."""
    ends = now() + lifetime
    row, _ = LoginCounter.objects.select_for_update().get_or_create(key=key, defaults={"expires": ends})
    row.count += 1
    if sliding:
        row.expires = ends
    row.save()
    return row


def expire_counters() -> None:
    LoginCounter.objects.filter(expires__lte=now()).delete()


@transaction.atomic
def count_failure(keys: dict[str, str]) -> None:
    expire_counters()  # first, so that bump() never adds to a count whose window is over
    window, memory = settings.FEEDBACK_LOGIN_WINDOW, settings.FEEDBACK_FAILURE_MEMORY
    bump(keys["address"], window)
    bump(keys["pair"], window)
    bump(keys["failed"], memory, sliding=True)
    account = bump(keys["account"], memory, sliding=True)
    beyond = account.count - settings.FEEDBACK_ACCOUNT_FAILURES
    if beyond >= 0:
        account.wait_until = now() + min(2.0 ** beyond, settings.FEEDBACK_ACCOUNT_MAX_DELAY)
        account.save(update_fields=["wait_until"])


@transaction.atomic
def count_busy(keys: dict[str, str]) -> None:
    expire_counters()
    bump(keys["address"], settings.FEEDBACK_LOGIN_WINDOW)


@transaction.atomic
def count_success(keys: dict[str, str]) -> None:
    LoginCounter.objects.filter(key=keys["pair"]).delete()
    known, _ = LoginCounter.objects.select_for_update().get_or_create(key=keys["known"], defaults={"expires": 0})
    known.count += 1
    known.expires = now() + settings.FEEDBACK_KNOWN_ADDRESS_DAYS * 24 * 3600
    known.save()


class Slots:
    """At most `size` password checks at once. A client served first queues for a slot; any other takes
    one only when one is free and nobody served first is waiting, so it never overtakes them."""

    def __init__(self, size: int):
        self.free = size
        self.waiting = 0
        self.changed = threading.Condition()

    def acquire(self, first: bool) -> bool:
        with self.changed:
            if first and self.waiting < settings.FEEDBACK_LOGIN_QUEUE:
                self.waiting += 1
                try:  # bounded: each waiting client holds one of the server's threads
                    ready = self.changed.wait_for(lambda: self.free > 0, timeout=settings.FEEDBACK_LOGIN_WAIT)
                finally:
                    self.waiting -= 1
            else:
                ready = self.free > 0 and self.waiting == 0
            if ready:
                self.free -= 1
            return ready

    def release(self) -> None:
        with self.changed:
            self.free += 1
            self.changed.notify()


SLOTS = Slots(settings.FEEDBACK_LOGIN_SLOTS)


class ThrottledLogin:
    """Mixed into a login form, before its AuthenticationForm, so that clean() checks the throttle first."""

    def clean(self):
        keys = counter_keys(self.cleaned_data.get("username") or "", client_address(self.request))
        counters = live_counters(keys)
        if error := refusal(counters):
            raise error
        known = "known" in counters or self.request.user.is_authenticated
        if not SLOTS.acquire(first=known or trusted(counters)):
            if not known:  # a flood's refusals cost the flooder; a known person's retries cost nothing
                count_busy(keys)
            raise ValidationError(BUSY, code="busy")
        cleaned = self.checked(keys)
        count_success(keys)
        return cleaned

    def checked(self, keys: dict[str, str]):
        """The form's own clean(), which hashes the password, inside a slot. The counts are read again
        first, as they may have reached a limit while this login waited, and a failure is counted
        before the slot is let go, so that the next login in it reads the count with this one."""
        try:
            if error := refusal(live_counters(keys)):
                raise error
            try:
                return super().clean()
            except ValidationError as error:
                if error.code == "invalid_login":
                    count_failure(keys)
                raise
        finally:
            SLOTS.release()


class LoginForm(ThrottledLogin, AuthenticationForm):
    pass


class AdminLoginForm(ThrottledLogin, AdminAuthenticationForm):
    pass


def refused(form) -> bool:
    """Whether a login form was turned away by the throttle (the view answers 429)."""
    return any(form.has_error("__all__", code) for code in ("throttled", "busy"))
