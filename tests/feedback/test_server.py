"""The real server (waitress, in a subprocess, on 127.0.0.1 only): HTTPS behind a reverse proxy, and
raters' answers during a flood of wrong-password logins (slow: run with -m slow)."""
import http.client
import json
import socket
import stat
import subprocess
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("waitress", reason="the server is waitress: pip install 'palm-rlhf[feedback]'")

from palm_rlhf.feedback.loadtest import free_port, start_server  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PUBLIC = "https://feedback.example.org"


def request(port: int, method: str, path: str, headers: dict, body: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if body is not None:
        headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    connection.request(method, path, body=urlencode(body) if body is not None else None, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, response.headers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`serve --origin https://... --behind-proxy` with one account, ann, as nginx would reach it (see docs/feedback.md)."""
    data = tmp_path_factory.mktemp("server") / "data"
    subprocess.run([sys.executable, "-m", "palm_rlhf.feedback", "--data-dir", str(data), "adduser", "ann",
                    "--password-file", "-"], input="a-long-pass-phrase\n", cwd=REPO, check=True, capture_output=True,
                   text=True)
    port = free_port()
    process = start_server(data, port, 4, "--origin", PUBLIC, "--behind-proxy")
    yield port, data
    process.terminate()
    process.wait(timeout=30)


def test_https_behind_a_proxy_end_to_end(server):
    port, data = server
    proxied = {"Host": "feedback.example.org", "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    status, headers = request(port, "GET", "/login/", proxied)
    assert status == 200 and headers["Strict-Transport-Security"] == "max-age=31536000"
    cookies = SimpleCookie()
    for line in headers.get_all("Set-Cookie"):
        cookies.load(line)
    assert cookies["csrftoken"]["secure"]
    form = {"username": "ann", "password": "a-long-pass-phrase", "csrfmiddlewaretoken": cookies["csrftoken"].value}
    status, headers = request(port, "POST", "/login/", {**proxied, "Origin": PUBLIC,
                                                         "Cookie": f"csrftoken={cookies['csrftoken'].value}"}, form)
    assert status == 302 and headers["Location"] == "/"
    assert "; Secure" in next(line for line in headers.get_all("Set-Cookie") if line.startswith("sessionid="))
    # while the server runs, SQLite's -wal and -shm exist beside the database, private like it
    modes = {name: oct(stat.S_IMODE((data / name).stat().st_mode)) for name in ("db.sqlite3", "db.sqlite3-wal",
                                                                              "db.sqlite3-shm")}
    assert set(modes.values()) == {"0o600"} and oct(stat.S_IMODE(data.stat().st_mode)) == "0o700"


def test_a_large_body_is_refused_before_it_is_read(server):
    """waitress's own limit is 1 GiB: an anonymous 400 MB POST /login/ was buffered to a 415 MB file first."""
    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(b"POST /login/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 400000000\r\n"
                           b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + b"x" * 1000)
        answer = connection.recv(200)  # at once: the server does not wait for the other 399,999,000 bytes
    assert answer.startswith(b"HTTP/1.1 413 ")


@pytest.mark.slow  # timings: meaningful only on a machine that is not busy with other work
def test_raters_stay_fast_during_a_login_flood():
    """2 raters answer for 10 s; in the second half 8 threads send wrong-password logins (1,500 at most)."""
    # 300 prompts: enough items that the raters are still answering in the second half (40 ran out)
    command = [sys.executable, "-m", "palm_rlhf.feedback.loadtest", "--raters", "2", "--seconds", "10",
               "--prompts", "300", "--flood", "8", "--flood-attempts", "1500", "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["errors"] == figures["lost"] == figures["unexpected"] == 0 and figures["ok"] > 10
    # one account: at most FEEDBACK_LOGIN_FAILURES passwords hashed, every other try refused before hashing
    assert figures["flood_checked"] <= 10 and figures["flood_refused"] > 50
    # unthrottled, hashing held the server's threads and cores: 74 ms calm, 2,460 ms flooded (p50)
    assert figures["flooded_ms_p50"] < 4 * figures["calm_ms_p50"] + 100, figures


@pytest.mark.slow  # timings: meaningful only on a machine that is not busy with other work
def test_real_logins_get_in_during_a_flood_from_ten_addresses():
    """Ten addresses with three threads each kept the hashing slots busy: no real login got in for 40 s."""
    command = [sys.executable, "-m", "palm_rlhf.feedback.attack", "flood", "--addresses", "10", "--threads", "3",
               "--seconds", "15"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    # the flood locks itself out within a few seconds; until then its queued first tries go ahead
    assert figures["real_served"] >= figures["real_logins"] / 2 and figures["attacker_checked"] <= 30, figures
