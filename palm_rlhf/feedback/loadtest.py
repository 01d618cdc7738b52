"""Load test: simulated raters submit against a real server on loopback, then every answer is counted.

    python -m palm_rlhf.feedback.loadtest --raters 50 --seconds 60
    python -m palm_rlhf.feedback.loadtest --raters 8 --seconds 20 --flood 8   # during a login flood

1. A fresh SQLite database in a temporary folder gets items (every rater may judge every item, so
   nobody runs out) and one account per rater.
2. `serve` starts in a subprocess on 127.0.0.1 (waitress, threaded), as a rater would find it.
3. Each rater is a thread: log in through the form (before the clock starts), then submit as htmx does (POST with the CSRF
   header, the next card comes back in the answer), half of them rating, half comparing. Every
   `--resend`th answer is sent twice, as a double click would; the second must get 409.
4. With `--flood N`, N more threads send wrong-password logins for one rater's account as fast as
   they can through the second half of the time, at most `--flood-attempts` in all. The raters'
   latencies in the calm first half and in the flooded second half then show whether password
   hashing under attack slows their answers (it must not: see throttle.py).
5. When time is up the server stops and the database is compared with the client's log: every
   answer the server acknowledged must be there once, with its value, and nothing else.
Requests go only to 127.0.0.1 and stop at the deadline.
"""
import argparse
import json
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

ITEM = re.compile(r'action="/answer/(\d+)/"')
# no more logins at once than the server hashes and queues with one slot (see throttle.py): each
# hashes a password on purpose slowly, and a login refused for busy slots counts against its address
LOGINS = threading.Semaphore(3)


class Rater:
    """One simulated person: a cookie jar, a login, and a log of acknowledged answers."""

    def __init__(self, base: str, name: str, password: str, kind: str):
        self.base, self.name, self.kind = base, name, kind
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.password = password
        self.acked: list[tuple[int, str]] = []  # (item id, value) answered with 200
        self.counts = {"submitted": 0, "ok": 0, "resent": 0, "resend_409": 0, "resend_accepted": 0, "errors": 0}
        self.latencies: list[tuple[float, float]] = []  # (when sent, seconds to answer)

    def csrf(self) -> str:
        return next(c.value for c in self.jar if c.name == "csrftoken")

    def request(self, path: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(self.base + path, data=body, headers=headers or {})
        start = time.monotonic()
        try:
            with self.opener.open(request, timeout=60) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        self.latencies.append((start, time.monotonic() - start))
        return status, text

    def log_in(self) -> str:
        with LOGINS:
            self.request("/login/")
            for _ in range(100):  # 429: the server is hashing as many passwords as it allows at once
                status, _ = self.request("/login/", {"username": self.name, "password": self.password,
                                                     "csrfmiddlewaretoken": self.csrf()})
                if status != 429:
                    break
                time.sleep(random.uniform(0.05, 0.3))
        status, page = self.request(f"/{self.kind}/")
        if status != 200 or "Log out" not in page:
            raise RuntimeError(f"{self.name} could not log in (status {status})")
        self.latencies.clear()  # the figures are for submitting, not for logging in
        return page

    def value(self) -> str:
        return str(random.randint(1, 5)) if self.kind == "rate" else random.choice(["a", "b", "tie", "skip"])

    def run(self, page: str, deadline: float, resend: int) -> None:
        field = "rating" if self.kind == "rate" else "choice"
        while time.monotonic() < deadline and (match := ITEM.search(page)):
            item, value = int(match.group(1)), self.value()
            path, headers = f"/answer/{item}/", {"HX-Request": "true", "X-CSRFToken": self.csrf()}
            status, text = self.request(path, {field: value}, headers)
            self.counts["submitted"] += 1
            if status != 200:
                self.counts["errors"] += 1
                status, page = self.request(f"/{self.kind}/")
                continue
            self.counts["ok"] += 1
            self.acked.append((item, value))
            page = text
            if self.counts["submitted"] % resend == 0:
                self.counts["resent"] += 1
                status, _ = self.request(path, {field: self.value()}, headers)
                self.counts["resend_409" if status == 409 else "resend_accepted"] += 1


def flood(base: str, username: str, begin: float, deadline: float, budget) -> dict:
    """Wrong-password logins for one account from `begin` to the deadline or until the shared `budget` runs out."""
    attacker = Rater(base, username, "not-the-password", "rate")
    attacker.request("/login/")
    time.sleep(max(0.0, begin - time.monotonic()))
    statuses = {"checked": 0, "refused": 0}  # checked: the password was hashed; refused: 429, before hashing
    while time.monotonic() < deadline and next(budget, None) is not None:  # next() on a range is atomic
        status, _ = attacker.request("/login/", {"username": username, "password": attacker.password,
                                                 "csrfmiddlewaretoken": attacker.csrf()})
        statuses["refused" if status == 429 else "checked"] += 1
    return statuses


def prepare(data_dir: Path, raters: int, prompts: int) -> str:
    """Items and accounts in a fresh database; returns the raters' shared password."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    from .tasks import add_responses

    for p in range(prompts):
        add_responses(f"Prompt {p}: say something kind.", [f"Response {p}.{r}" for r in range(3)],
                      source="loadtest", overlap=raters)
    password = "load-test-password"
    hashed = make_password(password)  # hashing once, not 50 times, keeps set-up quick
    get_user_model().objects.bulk_create(
        get_user_model()(username=f"rater{i:02d}", password=hashed) for i in range(raters)
    )
    return password


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, threads: int, *options: str) -> subprocess.Popen:
    """`serve` on 127.0.0.1 in a subprocess, with more `options` if given, once it answers."""
    command = [sys.executable, "-m", "palm_rlhf.feedback", "--data-dir", str(data_dir), "serve",
               "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads), *options]
    # the server's log goes to a file: a pipe nobody reads fills up and blocks the server
    log = open(data_dir / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the server holds its own copy
    deadline = time.monotonic() + 120  # importing torch alone can take a minute on a busy machine
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=1)
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"server did not start: {(data_dir / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("server did not answer within 120 s")


def check(raters: list[Rater]) -> dict:
    """Compare the database with what the server acknowledged to each rater."""
    from django.db.models import Count

    from .models import Answer

    answered = Answer.objects.filter(answered_at__isnull=False)
    in_db = {(a.rater.username, a.item_id, str(a.rating or a.choice)) for a in answered.select_related("rater")}
    acked = {(r.name, item, value) for r in raters for item, value in r.acked}
    duplicates = Answer.objects.values("item", "rater").annotate(n=Count("id")).filter(n__gt=1).count()
    return {"rows": answered.count(), "lost": len(acked - in_db), "unexpected": len(in_db - acked),
            "duplicate_rows": duplicates}


def percentiles(name: str, latencies: list[float], which=(50, 90, 99)) -> dict:
    latencies = sorted(latencies)
    return {f"{name}_ms_p{p}": round(1000 * latencies[len(latencies) * p // 100], 1) for p in which}


def summarise(raters: list[Rater], seconds: float, db: dict, floods: list[dict], flood_began: float) -> dict:
    totals = {key: sum(r.counts[key] for r in raters) for key in raters[0].counts}
    latencies = [(sent, x) for r in raters for sent, x in r.latencies]
    requests = len(latencies)
    result = {
        "raters": len(raters), "seconds": round(seconds, 1), **totals, **db,
        "requests": requests, "requests_per_s": round(requests / seconds, 1),
        "answers_per_s": round(totals["ok"] / seconds, 1),
        **percentiles("latency", [x for _, x in latencies]),
    }
    if floods:
        result.update({f"flood_{key}": sum(f[key] for f in floods) for key in ("checked", "refused")})
        result.update(percentiles("calm", [x for sent, x in latencies if sent < flood_began], which=(50, 90)))
        result.update(percentiles("flooded", [x for sent, x in latencies if sent >= flood_began], which=(50, 90)))
    return result


def in_threads(functions: list) -> list:
    """Call each function in its own thread at once; their results, in order."""
    results = [None] * len(functions)

    def call(i):
        results[i] = functions[i]()

    workers = [threading.Thread(target=call, args=(i,)) for i in range(len(functions))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def run(raters: int = 50, seconds: float = 60, threads: int = 8, prompts: int = 400, resend: int = 10,
        floods: int = 0, flood_attempts: int = 2000) -> dict:
    from .__main__ import migrate, setup_django

    with tempfile.TemporaryDirectory(prefix="feedback-load-") as folder:
        data_dir = Path(folder)
        setup_django(str(data_dir))
        migrate()
        password = prepare(data_dir, raters, prompts)
        port = free_port()
        server = start_server(data_dir, port, threads)
        try:
            people = [Rater(f"http://127.0.0.1:{port}", f"rater{i:02d}", password, ["rate", "compare"][i % 2])
                      for i in range(raters)]
            # logging in is slow on purpose (password hashing), so it happens before the clock
            # starts: the minute measures submitting answers
            pages = in_threads([p.log_in for p in people])
            start = time.monotonic()
            flood_begins, budget = start + seconds / 2, iter(range(flood_attempts))
            results = in_threads(
                [lambda p=p, page=page: p.run(page, start + seconds, resend) for p, page in zip(people, pages)]
                + [lambda: flood(people[0].base, people[0].name, flood_begins, start + seconds, budget)] * floods)
            elapsed = time.monotonic() - start
        finally:
            server.terminate()
            server.wait(timeout=30)
        return summarise(people, elapsed, check(people), results[raters:], flood_begins)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raters", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, default=8, help="server worker threads")
    parser.add_argument("--prompts", type=int, default=400, help="prompts x 3 responses make the items")
    parser.add_argument("--resend", type=int, default=10, help="send every Nth answer twice")
    parser.add_argument("--flood", type=int, default=0, help="threads sending wrong-password logins, second half")
    parser.add_argument("--flood-attempts", type=int, default=2000, help="wrong-password logins in all, at most")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    result = run(args.raters, args.seconds, args.threads, args.prompts, args.resend, args.flood, args.flood_attempts)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in result.items()))
    if result["lost"] or result["unexpected"] or result["duplicate_rows"] or result["resend_accepted"]:
        sys.exit("FAILED: the database does not match the acknowledged answers")


if __name__ == "__main__":
    main()
