"""Logging in: failed logins throttled before any password is hashed, and HTTPS behind a reverse proxy."""
import threading
import time

import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")

from django.contrib.auth.backends import ModelBackend  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from palm_rlhf.feedback import throttle  # noqa: E402
from palm_rlhf.feedback.models import LoginCounter  # noqa: E402
from palm_rlhf.feedback.settings import public_settings  # noqa: E402

pytestmark = pytest.mark.django_db
PUBLIC = "https://feedback.example.org"


@pytest.fixture
def checked(monkeypatch):
    """The usernames of the logins that reached the password check (each one hashes a password)."""
    names = []
    authenticate = ModelBackend.authenticate

    def counted(self, request, username=None, password=None, **kwargs):
        names.append(username)
        return authenticate(self, request, username=username, password=password, **kwargs)

    monkeypatch.setattr(ModelBackend, "authenticate", counted)
    return names


@pytest.fixture
def clock(monkeypatch):
    """The throttle's clock, in seconds, to move by hand."""
    seconds = [1_000_000.0]
    monkeypatch.setattr(throttle, "now", lambda: seconds[0])
    return seconds


def log_in(client, username, password, path="/login/", **headers):
    return client.post(path, {"username": username, "password": password}, **headers)


def failures_of(address: str) -> int:
    row = LoginCounter.objects.filter(key=throttle.counter_keys("", address)["address"]).first()
    return row.count if row else 0


@override_settings(FEEDBACK_PAIR_FAILURES=3, FEEDBACK_LOGIN_WINDOW=600)
def test_failed_logins_lock_an_account_from_that_address_for_one_window(client, rater, checked, clock):
    rater("ann")
    for _ in range(3):
        response = log_in(client, "ann", "wrong")
        assert response.status_code == 200 and "correct username and password" in response.content.decode()
        clock[0] += 60
    refused = log_in(client, "ann", "ann-password")  # even the right password, from the address that failed
    assert refused.status_code == 429
    assert ("Too many failed logins from your address for this account. Try again in 7 min."
            in refused.content.decode())
    assert len(checked) == 3  # the refused login hashed nothing
    clock[0] += 7 * 60  # the window, from the first failure, ends: the address is kept out no longer
    assert log_in(client, "ann", "ann-password").status_code == 302


def test_an_attackers_failures_never_lock_the_right_password_out_elsewhere(rater, clock):
    """Ten wrong passwords from one address used to make the right one 429 from anywhere for 15 minutes."""
    rater("ann")
    attacker = Client(REMOTE_ADDR="203.0.113.7")
    for _ in range(10):
        assert log_in(attacker, "ann", "wrong").status_code == 200
        clock[0] += 60  # past the account's delays, which only a guesser's address must wait out
    assert log_in(attacker, "ann", "ann-password").status_code == 429
    assert log_in(Client(REMOTE_ADDR="198.51.100.2"), "ann", "ann-password").status_code == 302


@override_settings(FEEDBACK_ACCOUNT_FAILURES=3)
def test_an_accounts_failures_delay_untrusted_clients_by_doubling_delays(rater, clock):
    rater("ann")
    home = Client(REMOTE_ADDR="198.51.100.2")
    assert log_in(home, "ann", "ann-password").status_code == 302  # a known address for ann from now on
    attackers = [Client(REMOTE_ADDR=f"203.0.113.{i}") for i in range(4)]
    for attacker in attackers[:3]:  # first tries from clean addresses are never delayed
        assert log_in(attacker, "ann", "wrong").status_code == 200
    refused = log_in(attackers[0], "ann", "wrong")  # the 3rd failure began a delay of 1 s
    assert refused.status_code == 429 and "try again in 1 s" in refused.content.decode()
    clock[0] += 1
    assert log_in(attackers[0], "ann", "wrong").status_code == 200  # the 4th: 2 s
    clock[0] += 1.5
    assert log_in(attackers[1], "ann", "wrong").status_code == 429
    clock[0] += 0.5
    assert log_in(attackers[1], "ann", "wrong").status_code == 200  # the 5th: 4 s
    assert log_in(attackers[2], "ann", "ann-password").status_code == 429  # a guesser's address, even right
    assert log_in(attackers[3], "ann", "ann-password").status_code == 302  # an address that never failed
    assert log_in(home, "ann", "wrong").status_code == 200  # the real user mistypes: 8 s
    assert log_in(home, "ann", "ann-password").status_code == 302  # yet their known address is never delayed


@override_settings(FEEDBACK_ACCOUNT_FAILURES=2, FEEDBACK_ACCOUNT_MAX_DELAY=5, FEEDBACK_LOGIN_WINDOW=600,
                   FEEDBACK_FAILURE_MEMORY=3600)
def test_an_accounts_delays_stop_growing_and_outlast_a_window(rater, clock):
    rater("ann")
    attacker = Client(REMOTE_ADDR="203.0.113.7")
    for _ in range(6):  # no delay, then 1, 2, 4, 5, 5 s
        assert log_in(attacker, "ann", "wrong").status_code == 200
        clock[0] += 5
    account = throttle.counter_keys("ann", "")["account"]
    assert LoginCounter.objects.get(key=account).wait_until == clock[0]
    clock[0] += 600  # the address's window and the pair's are over; the account's failures are not forgotten
    assert log_in(attacker, "ann", "wrong").status_code == 200
    assert log_in(attacker, "ann", "wrong").status_code == 429
    clock[0] += 3600  # a failure memory after the last failure, the account starts afresh
    assert log_in(attacker, "ann", "wrong").status_code == 200
    assert LoginCounter.objects.get(key=account).count == 1


def test_a_flood_of_new_usernames_never_pushes_out_a_lock(rater, clock):
    """Counts kept in a cache of 300 entries were evicted by 300 failures with new names: guesses again."""
    rater("ann")
    attacker = Client(REMOTE_ADDR="203.0.113.7")
    for _ in range(10):
        assert log_in(attacker, "ann", "wrong").status_code == 200
        clock[0] += 60  # past the account's delays, so that the pair's count reaches its limit
    for i in range(400):  # 20 addresses, each below its own limit
        assert log_in(Client(REMOTE_ADDR=f"198.51.100.{i % 20}"), f"new-user-{i}", "wrong").status_code == 200
    refused = log_in(attacker, "ann", "ann-password")
    assert refused.status_code == 429 and "for this account. Try again in 5 min." in refused.content.decode()
    assert failures_of("203.0.113.7") == 10 and LoginCounter.objects.count() == 4 + 2 * 20 + 2 * 400


@override_settings(FEEDBACK_FAILURE_MEMORY=3600)
def test_expired_counters_are_deleted(rater, clock):
    log_in(Client(REMOTE_ADDR="203.0.113.7"), "amy", "wrong")
    clock[0] += 15 * 60  # its window over, the address may fail 50 times again, but is not trusted yet
    log_in(Client(REMOTE_ADDR="198.51.100.2"), "ben", "wrong")
    assert failures_of("203.0.113.7") == 0 and LoginCounter.objects.count() == 2 + 4
    clock[0] += 3600
    log_in(Client(REMOTE_ADDR="198.51.100.2"), "ben", "wrong")
    assert LoginCounter.objects.count() == 4  # only the failure just counted


@override_settings(FEEDBACK_ADDRESS_FAILURES=4)
def test_failed_logins_from_one_address_are_throttled(rater, checked):
    rater("ann")
    guesser = Client(REMOTE_ADDR="203.0.113.7")
    for name in ("amy", "ben", "cal", "dee"):  # one try each at many accounts
        assert log_in(guesser, name, "guess").status_code == 200
    refused = log_in(guesser, "ann", "ann-password")
    assert refused.status_code == 429 and "from your address. Try again in 15 min." in refused.content.decode()
    assert log_in(Client(REMOTE_ADDR="198.51.100.2"), "ann", "ann-password").status_code == 302
    assert checked == ["amy", "ben", "cal", "dee", "ann"]


@override_settings(FEEDBACK_PAIR_FAILURES=3)
def test_a_successful_login_clears_its_addresss_failures_for_the_account(client, rater):
    rater("ann")
    for _ in range(2):
        log_in(client, "ann", "wrong")
    assert log_in(client, "ann", "ann-password").status_code == 302
    for _ in range(2):
        log_in(client, "ann", "wrong")
    assert log_in(client, "ann", "ann-password").status_code == 302  # 2 + 2 failures, never 3 in a row


@override_settings(FEEDBACK_ADDRESS_FAILURES=2, FEEDBACK_BEHIND_PROXY=True)
def test_behind_a_proxy_the_address_is_the_one_the_proxy_appended(rater):
    rater("ann")
    proxy = Client(REMOTE_ADDR="127.0.0.1")  # every request comes from the proxy
    for name in ("amy", "ben"):
        log_in(proxy, name, "guess", HTTP_X_FORWARDED_FOR="192.0.2.1, 203.0.113.7")
    # the same client, naming another address in front of the proxy's entry, is still throttled
    assert log_in(proxy, "ann", "ann-password", HTTP_X_FORWARDED_FOR="192.0.2.99, 203.0.113.7").status_code == 429
    assert log_in(proxy, "ann", "ann-password", HTTP_X_FORWARDED_FOR="198.51.100.2").status_code == 302


@pytest.fixture
def hold_slots():
    """hold() takes every hashing slot, as logins being checked would; the function it returns frees them."""
    held = []

    def release():
        while held:
            held.pop()
            throttle.SLOTS.release()

    def hold():
        while throttle.SLOTS.acquire(first=False):
            held.append(True)
        return release

    yield hold
    release()


def test_busy_slots_serve_clients_without_failures_first_and_count_against_the_others(rater, checked, hold_slots):
    """A flood that kept the slots busy refused nearly every real login, and its refusals cost it nothing."""
    rater("ann")
    guesser = Client(REMOTE_ADDR="203.0.113.7")
    log_in(guesser, "ann", "wrong")
    del checked[:]
    release = hold_slots()
    refused = log_in(guesser, "amy", "wrong")
    assert refused.status_code == 429 and "checking other logins" in refused.content.decode()
    assert failures_of("203.0.113.7") == 2 and checked == []
    threading.Timer(0.3, release).start()  # the logins being checked finish
    started = time.monotonic()
    assert log_in(Client(REMOTE_ADDR="198.51.100.2"), "ann", "ann-password").status_code == 302  # it waited
    assert time.monotonic() - started >= 0.25 and checked == ["ann"]


@override_settings(FEEDBACK_LOGIN_QUEUE=0)
def test_busy_refusals_count_against_an_unknown_address_even_without_failures(rater, hold_slots):
    """Ten fresh addresses flooding the slots used 3-4 of their 50 failures each while no real login got in."""
    rater("ann")
    release = hold_slots()
    fresh = Client(REMOTE_ADDR="198.51.100.2")
    assert log_in(fresh, "ann", "ann-password").status_code == 429
    assert failures_of("198.51.100.2") == 1
    release()
    assert log_in(fresh, "ann", "ann-password").status_code == 302


@override_settings(FEEDBACK_LOGIN_WAIT=0.1)
def test_a_logged_in_browser_is_served_first_and_a_wait_that_runs_out_counts_nothing(client_for, checked, hold_slots):
    ann = client_for("ann", REMOTE_ADDR="203.0.113.7")
    log_in(Client(REMOTE_ADDR="203.0.113.7"), "amy", "wrong")  # ann's address has failed, once
    del checked[:]
    release = hold_slots()
    with override_settings(FEEDBACK_LOGIN_QUEUE=0):  # nobody may wait: the logged-in browser is refused at once
        assert log_in(ann, "ann", "ann-password").status_code == 429
    assert log_in(ann, "ann", "ann-password").status_code == 429  # waited 0.1 s for a slot, in vain
    assert failures_of("203.0.113.7") == 1 and checked == []
    release()
    assert log_in(ann, "ann", "ann-password").status_code == 302


@override_settings(FEEDBACK_PAIR_FAILURES=2)
def test_the_admin_login_is_throttled_too(client, rater, checked):
    rater("boss", staff=True)
    for _ in range(2):
        log_in(client, "boss", "wrong", path="/admin/login/")
    refused = log_in(client, "boss", "boss-password", path="/admin/login/")
    assert refused.status_code == 429 and "Too many failed logins" in refused.content.decode() and len(checked) == 2
    assert client.get("/stats/").status_code == 302  # not logged in


def test_public_settings():
    https = public_settings(PUBLIC + "/", behind_proxy=True, hosts=["localhost"])
    assert https["CSRF_TRUSTED_ORIGINS"] == [PUBLIC] and https["ALLOWED_HOSTS"] == ["localhost", "feedback.example.org"]
    assert https["SECURE_PROXY_SSL_HEADER"] == ("HTTP_X_FORWARDED_PROTO", "https") and https["FEEDBACK_BEHIND_PROXY"]
    assert https["SESSION_COOKIE_SECURE"] and https["CSRF_COOKIE_SECURE"] and https["SECURE_HSTS_SECONDS"] >= 86400
    http = public_settings("http://10.0.0.5:8000", behind_proxy=False, hosts=[])
    assert http["CSRF_TRUSTED_ORIGINS"] == ["http://10.0.0.5:8000"] and http["ALLOWED_HOSTS"] == ["10.0.0.5"]
    assert not {"SECURE_PROXY_SSL_HEADER", "SESSION_COOKIE_SECURE", "SECURE_HSTS_SECONDS"} & set(http)
    for bad in ("feedback.example.org", "https://feedback.example.org/app", "ftp://x"):
        with pytest.raises(ValueError, match="must look like"):
            public_settings(bad, behind_proxy=False, hosts=[])


# nginx passes on the public host with `proxy_set_header Host $host`, else the upstream's address
@pytest.mark.parametrize("host", ["feedback.example.org", "127.0.0.1:8000"])
def test_login_over_https_behind_a_proxy(rater, host):
    rater("ann")
    with override_settings(**public_settings(PUBLIC, behind_proxy=True, hosts=["127.0.0.1"])):
        client = Client(enforce_csrf_checks=True)
        proxied = {"HTTP_HOST": host, "HTTP_X_FORWARDED_PROTO": "https", "HTTP_X_FORWARDED_FOR": "203.0.113.7"}
        page = client.get("/login/", **proxied)
        assert page["Strict-Transport-Security"] == "max-age=31536000"
        assert client.cookies["csrftoken"]["secure"]
        form = {"username": "ann", "password": "ann-password", "csrfmiddlewaretoken": client.cookies["csrftoken"].value}
        response = client.post("/login/", form, HTTP_ORIGIN=PUBLIC, **proxied)
        assert response.status_code == 302 and client.cookies["sessionid"]["secure"]
        assert client.post("/login/", form, HTTP_ORIGIN="https://evil.example", **proxied).status_code == 403
