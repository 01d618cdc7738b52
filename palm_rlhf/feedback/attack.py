"""Attacks on the login throttle, run as an outsider would, with the figures docs/feedback.md quotes.

    python -m palm_rlhf.feedback.attack flood --addresses 1 --threads 3    # real logins during a flood
    python -m palm_rlhf.feedback.attack flood --addresses 10 --threads 3
    python -m palm_rlhf.feedback.attack lockout                            # the right password after 10 failures
    python -m palm_rlhf.feedback.attack hour --addresses 10                # guesses at one account in an hour

flood and lockout start `serve --behind-proxy` on 127.0.0.1 with the real password hasher, and each
client names its address in X-Forwarded-For, as the proxy in front would.
- flood: every attacking thread sends wrong passwords, each for a new username, for --seconds; one
  real user at a time logs in with the right password from an address of their own, every --every s.
- lockout: ten wrong passwords for one account from one address, then the right one from another
  address and from the attacker's.
- hour: an hour of guessing at one account with the throttle's clock moved by hand, in this process
  (Django's test client, a fast hasher). Each attacking address tries again as soon as the last
  refusal said it may; the figure is how many tries reached the password check.
"""
import argparse
import http.client
import json
import re
import tempfile
import time
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

from .loadtest import free_port, in_threads, start_server

PASSWORD = "the-right-pass-phrase"


def make_accounts(names: list[str]) -> None:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    hashed = make_password(PASSWORD)  # once, not once a name, which keeps set-up quick
    get_user_model().objects.bulk_create(get_user_model()(username=name, password=hashed) for name in names)


def prepared_server(folder: Path, accounts: list[str]):
    from .__main__ import migrate, setup_django

    setup_django(str(folder))
    migrate()
    make_accounts(accounts)
    port = free_port()
    return start_server(folder, port, 8, "--behind-proxy"), port


def request(port: int, method: str, headers: dict, body: str | None = None) -> tuple[int, str, str]:
    """(status, page, Set-Cookie) of one request for /login/."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, "/login/", body=body, headers=headers)
    response = connection.getresponse()
    page = response.read().decode()
    connection.close()
    return response.status, page, response.getheader("Set-Cookie", "")


def log_in(port: int, username: str, password: str, address: str) -> tuple[int, str]:
    """One login from `address` (the form, then its POST): status 302 in, 200 wrong, 429 refused; the page."""
    headers = {"X-Forwarded-For": address}
    token = SimpleCookie(request(port, "GET", headers)[2])["csrftoken"].value
    body = urlencode({"username": username, "password": password, "csrfmiddlewaretoken": token})
    status, page, _ = request(port, "POST", {**headers, "Cookie": f"csrftoken={token}",
                                             "Content-Type": "application/x-www-form-urlencoded"}, body)
    return status, page


def flood(addresses: int, threads: int, seconds: float, every: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="feedback-attack-") as folder:
        real_users = [f"rater{i:03d}" for i in range(int(seconds / every) + 10)]
        server, port = prepared_server(Path(folder), real_users)
        try:
            deadline = time.monotonic() + seconds
            names = iter(range(10**9))  # next() on a range iterator is atomic: one new username per try

            def attacker(address):
                statuses = []
                while time.monotonic() < deadline:
                    statuses.append(log_in(port, f"guess{next(names)}", "wrong", address)[0])
                return statuses

            def real_logins():
                statuses = []
                for i, name in enumerate(real_users):
                    if time.monotonic() > deadline:
                        break
                    statuses.append(log_in(port, name, PASSWORD, f"10.1.{i // 250}.{i % 250}")[0])
                    time.sleep(every)
                return statuses

            results = in_threads([real_logins] + [lambda a=a: attacker(f"203.0.113.{a}")
                                                  for a in range(addresses) for _ in range(threads)])
        finally:
            server.terminate()
            server.wait(timeout=30)
    real, attacks = results[0], [s for statuses in results[1:] for s in statuses]
    return {"real_logins": len(real), "real_served": real.count(302), "real_refused": real.count(429),
            "attacker_tries": len(attacks), "attacker_checked": attacks.count(200),
            "attacker_refused": attacks.count(429)}


def retry_after(page: str) -> int:
    """Seconds until a refused login may try again, from the 429 page: "in 7 min" or "in 4 s"."""
    number, unit = re.search(r"in (\d+) (min|s)\b", page).groups()
    return int(number) * (60 if unit == "min" else 1)


def lockout() -> dict:
    with tempfile.TemporaryDirectory(prefix="feedback-attack-") as folder:
        server, port = prepared_server(Path(folder), ["ann"])
        try:
            started, failures = time.monotonic(), 0
            while failures < 10:  # ten that reach the password check: the account's delays waited out
                status, page = log_in(port, "ann", "wrong", "203.0.113.7")
                failures += status == 200
                if status == 429:
                    time.sleep(retry_after(page))
            waited = time.monotonic() - started
            elsewhere, _ = log_in(port, "ann", PASSWORD, "198.51.100.2")
            status, page = log_in(port, "ann", PASSWORD, "203.0.113.7")
            return {"attacker_failures": failures, "attacker_seconds": round(waited, 1),
                    "right_password_elsewhere": elsewhere, "right_password_from_attacker": status,
                    "told": re.search(r"Too many[^<]*", page).group(0)}
        finally:
            server.terminate()
            server.wait(timeout=30)


def hour(addresses: int, seconds: float = 3600) -> dict:
    from .__main__ import migrate, setup_django

    with tempfile.TemporaryDirectory(prefix="feedback-attack-") as folder:
        setup_django(folder)
        from django.test import Client, override_settings
        from django.test.utils import setup_test_environment

        from . import throttle

        setup_test_environment()  # the test client's host name is allowed
        migrate()
        attackers = [Client(REMOTE_ADDR=f"203.0.113.{a}") for a in range(addresses)]
        next_try = [0.0] * addresses  # seconds into the hour
        checked = tries = 0
        with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
            make_accounts(["ann"])
            while min(next_try) < seconds:
                a = next_try.index(min(next_try))
                throttle.now = lambda: 1e9 + next_try[a]  # the hour, compressed: nobody waits for real
                tries += 1
                response = attackers[a].post("/login/", {"username": "ann", "password": "wrong"})
                if response.status_code == 200:
                    checked += 1
                else:
                    next_try[a] += retry_after(response.content.decode())
    return {"addresses": addresses, "seconds": seconds, "tries": tries, "guesses_checked": checked}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attack", choices=["flood", "lockout", "hour"])
    parser.add_argument("--addresses", type=int, default=1, help="attacking client addresses")
    parser.add_argument("--threads", type=int, default=3, help="flood: threads per attacking address")
    parser.add_argument("--seconds", type=float, default=30, help="flood: how long")
    parser.add_argument("--every", type=float, default=0.5, help="flood: seconds between real logins")
    args = parser.parse_args(argv)
    if args.attack == "flood":
        result = flood(args.addresses, args.threads, args.seconds, args.every)
    else:
        result = lockout() if args.attack == "lockout" else hour(args.addresses)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
