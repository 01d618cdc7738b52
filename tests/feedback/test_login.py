"""Logging in: failed logins throttled before any password is hashed, and HTTPS behind a reverse proxy."""
import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")

from django.contrib.auth.backends import ModelBackend  # noqa: E402
from django.test import Client, override_settings  # noqa: E402

from palm_rlhf.feedback import throttle  # noqa: E402
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


@override_settings(FEEDBACK_LOGIN_FAILURES=3, FEEDBACK_LOGIN_WINDOW=600)
def test_failed_logins_lock_an_account_for_one_window(client, rater, checked, clock):
    rater("ann")
    for _ in range(3):
        response = log_in(client, "ann", "wrong")
        assert response.status_code == 200 and "correct username and password" in response.content.decode()
        clock[0] += 60
    refused = log_in(client, "ann", "ann-password")  # even the right password, while the account is locked
    assert refused.status_code == 429
    assert "Too many failed logins for this account or from your address. Try again in 7 min." in refused.content.decode()
    assert log_in(Client(REMOTE_ADDR="198.51.100.2"), "ann", "ann-password").status_code == 429  # from anywhere
    assert len(checked) == 3  # the refused logins hashed nothing
    clock[0] += 7 * 60  # the window, from the first failure, ends: the real user is kept out no longer
    assert log_in(client, "ann", "ann-password").status_code == 302


@override_settings(FEEDBACK_LOGIN_FAILURES=3)
def test_a_successful_login_clears_the_accounts_failures(client, rater):
    rater("ann")
    for _ in range(2):
        log_in(client, "ann", "wrong")
    assert log_in(client, "ann", "ann-password").status_code == 302
    for _ in range(2):
        log_in(Client(), "ann", "wrong")
    assert log_in(Client(), "ann", "ann-password").status_code == 302  # 2 + 2 failures, never 3 in a row


@override_settings(FEEDBACK_ADDRESS_FAILURES=4)
def test_failed_logins_from_one_address_are_throttled(rater, checked):
    rater("ann")
    guesser = Client(REMOTE_ADDR="203.0.113.7")
    for name in ("amy", "ben", "cal", "dee"):  # one try each at many accounts
        assert log_in(guesser, name, "guess").status_code == 200
    assert log_in(guesser, "ann", "ann-password").status_code == 429
    assert log_in(Client(REMOTE_ADDR="198.51.100.2"), "ann", "ann-password").status_code == 302
    assert checked == ["amy", "ben", "cal", "dee", "ann"]


@override_settings(FEEDBACK_ADDRESS_FAILURES=2, FEEDBACK_BEHIND_PROXY=True)
def test_behind_a_proxy_the_address_is_the_one_the_proxy_appended(rater):
    rater("ann")
    proxy = Client(REMOTE_ADDR="127.0.0.1")  # every request comes from the proxy
    for name in ("amy", "ben"):
        log_in(proxy, name, "guess", HTTP_X_FORWARDED_FOR="192.0.2.1, 203.0.113.7")
    # the same client, naming another address in front of the proxy's entry, is still throttled
    assert log_in(proxy, "ann", "ann-password", HTTP_X_FORWARDED_FOR="192.0.2.99, 203.0.113.7").status_code == 429
    assert log_in(proxy, "ann", "ann-password", HTTP_X_FORWARDED_FOR="198.51.100.2").status_code == 302


def test_a_login_beyond_the_hashing_slots_is_refused_at_once(client, rater, checked):
    rater("ann")
    held = 0
    while throttle.SLOTS.acquire(blocking=False):  # every slot busy hashing someone's password
        held += 1
    try:
        response = log_in(client, "ann", "ann-password")
        assert response.status_code == 429 and "checking other logins" in response.content.decode()
        assert checked == []
    finally:
        for _ in range(held):
            throttle.SLOTS.release()
    assert held >= 1 and log_in(client, "ann", "ann-password").status_code == 302


@override_settings(FEEDBACK_LOGIN_FAILURES=2)
def test_the_admin_login_is_throttled_too(client, rater, checked):
    rater("boss", staff=True)
    for _ in range(2):
        log_in(client, "boss", "wrong", path="/admin/login/")
    page = log_in(client, "boss", "boss-password", path="/admin/login/").content.decode()
    assert "Too many failed logins" in page and len(checked) == 2
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
