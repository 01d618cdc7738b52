"""The command line: adduser's password handling and roles, item options refused, a private database."""
import getpass
import io
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("django", reason="the feedback app needs: pip install 'palm-rlhf[feedback]'")
pytest.importorskip("pytest_django", reason="the feedback tests need pytest-django")

from palm_rlhf.feedback import __main__ as cli  # noqa: E402
from palm_rlhf.feedback.apps import private_sqlite_file  # noqa: E402
from palm_rlhf.feedback.settings import private_folder  # noqa: E402

GOOD = "a-long-pass-phrase"
REPO = Path(__file__).resolve().parents[2]


def adduser(monkeypatch, *argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    cli.adduser(cli.parse_args(["adduser", *argv]))


def exit_message(call) -> str:
    with pytest.raises(SystemExit) as exit:
        call()
    return exit.value.code


@pytest.mark.django_db
def test_adduser_asks_twice_without_echo(monkeypatch, django_user_model, capsys):
    prompts, typed = [], iter([GOOD, GOOD, GOOD, "a-different-pass-phrase"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt: prompts.append(prompt) or next(typed))
    cli.adduser(cli.parse_args(["adduser", "ann"]))
    assert prompts == ["password for ann: ", "the same again: "] and "created rater ann" in capsys.readouterr().out
    assert exit_message(lambda: cli.adduser(cli.parse_args(["adduser", "bob"]))) == "the two passwords differ"
    assert list(django_user_model.objects.values_list("username", flat=True)) == ["ann"]


def test_a_password_is_never_an_argument():
    """Arguments show in `ps` and shell history; and no abbreviation of --password-file may stand in."""
    for flag in ("--password", "--password-f"):
        assert exit_message(lambda: cli.parse_args(["adduser", "ann", flag, GOOD])) == 2  # argparse's usage error


@pytest.mark.django_db
@pytest.mark.parametrize("password", ["1", "password", "ann-the-rater", "48213975620"])
def test_adduser_runs_the_password_validators(monkeypatch, django_user_model, password):
    message = exit_message(lambda: adduser(monkeypatch, "ann-the-rater", "--password-file", "-", stdin=password))
    assert message.startswith("password refused: ") and "\n" not in message
    assert not django_user_model.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("flags,staff,superuser", [([], False, False), (["--staff"], True, False),
                                                   (["--superuser"], True, True)])
def test_adduser_keeps_staff_and_superuser_apart(monkeypatch, django_user_model, flags, staff, superuser):
    adduser(monkeypatch, "ann", "--password-file", "-", *flags, stdin=GOOD + "\n")
    user = django_user_model.objects.get(username="ann")
    assert (user.is_staff, user.is_superuser) == (staff, superuser)


@pytest.mark.django_db
def test_adduser_reads_a_password_file_and_refuses_a_duplicate(monkeypatch, django_user_model, tmp_path):
    (tmp_path / "pw").write_text(GOOD + "\nsecond line ignored\n")
    adduser(monkeypatch, "ann", "--password-file", str(tmp_path / "pw"))
    assert django_user_model.objects.get(username="ann").check_password(GOOD)
    message = exit_message(lambda: adduser(monkeypatch, "ann", "--password-file", "-", stdin=GOOD))
    assert message == "username refused: a user named 'ann' exists already"


@pytest.mark.django_db
@pytest.mark.parametrize("name,message", [
    ("ALICE", "a user named 'alice' exists already"),  # the invite form refused it; adduser made it
    ("", "a username is needed"),  # crashed with ValueError
    ("   ", "a username is needed"),
    ("a" * 300, "a username has at most 150 characters, not 300"),
    ("<b>boss</b>", "a username may hold only letters, digits and @ . + - _"),
    ("m 1", "a username may hold only letters, digits and @ . + - _"),
])
def test_adduser_checks_the_username_like_every_other_way_in(monkeypatch, django_user_model, name, message):
    django_user_model.objects.create_user("alice", password=GOOD)
    assert exit_message(lambda: adduser(monkeypatch, name, "--password-file", "-", stdin=GOOD)) == (
        "username refused: " + message)
    assert list(django_user_model.objects.values_list("username", flat=True)) == ["alice"]


@pytest.mark.django_db
def test_adduser_stores_the_name_that_login_reads(monkeypatch, django_user_model, client, capsys):
    """' m1' was created with its space, but login strips it and reached the account m1 instead."""
    django_user_model.objects.create_user("m1", password="m1-password-of-m1")
    message = exit_message(lambda: adduser(monkeypatch, " m1", "--password-file", "-", stdin=GOOD))
    assert message == "username refused: a user named 'm1' exists already"
    adduser(monkeypatch, " m2\u2003", "--password-file", "-", stdin=GOOD)  # an em space too
    assert capsys.readouterr().out == "created rater m2\n"
    assert client.post("/login/", {"username": " m2", "password": GOOD}).status_code == 302


def test_manage_createsuperuser_points_to_adduser():
    assert "adduser NAME --superuser" in exit_message(lambda: cli.main(["manage", "createsuperuser"]))


@pytest.mark.parametrize("argv,message", [
    (["import", "in.jsonl", "--num-bins", "0"], "--num-bins must be from 2 to 100, not 0"),
    (["import", "in.jsonl", "--num-bins", "-1"], "--num-bins must be from 2 to 100, not -1"),
    (["import", "in.jsonl", "--num-bins", "100000"], "--num-bins must be from 2 to 100, not 100000"),
    (["serve", "--num-bins", "1"], "--num-bins must be from 2 to 100, not 1"),
    (["generate", "--overlap", "0"], "--overlap must be from 1 to 1000, not 0"),
    (["import", "in.jsonl", "--overlap", "-3"], "--overlap must be from 1 to 1000, not -3"),
    (["import", "in.jsonl", "--overlap", "40000"], "--overlap must be from 1 to 1000, not 40000"),
    (["generate", "--samples", "0"], "--samples must be from 1 to 1000, not 0"),
    (["generate", "--seq-len", "1"], "--seq-len must be from 2 to 65536, not 1"),
    (["generate", "--temperature", "nan"], "--temperature must be from 0 to 100, not nan"),
    (["serve", "--temperature", "-1"], "--temperature must be from 0 to 100, not -1.0"),
    # 0 threads accepted connections and never answered; port 70000 printed 70000 and listened on 4464
    (["serve", "--threads", "0"], "--threads must be from 1 to 1000, not 0"),
    (["serve", "--port", "70000"], "--port must be from 1 to 65535, not 70000"),
    (["serve", "--port", "0"], "--port must be from 1 to 65535, not 0"),
    (["serve", "--max-body-size", "10"], "--max-body-size must be from 1024 to 1073741824, not 10"),
])
def test_options_out_of_range_are_refused_in_one_line(argv, message):
    assert exit_message(lambda: cli.parse_args(argv)) == message


def test_database_and_its_wal_files_are_private(tmp_path):
    old_umask = os.umask(0o022)  # the usual one, under which files come out world-readable
    try:
        data = tmp_path / "data"
        data.mkdir(mode=0o755)
        (data / "db.sqlite3").write_text("")  # a database from before the app made its files private
        private_folder(data)
        private_sqlite_file(str(data / "db.sqlite3"))
        connection = sqlite3.connect(data / "db.sqlite3")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE t (x)")
        connection.commit()
        modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in data.iterdir()}
        connection.close()
    finally:
        os.umask(old_umask)
    assert modes == {name: "0o600" for name in ("db.sqlite3", "db.sqlite3-wal", "db.sqlite3-shm")}
    assert oct(stat.S_IMODE(data.stat().st_mode)) == "0o700"


def test_a_folder_the_app_did_not_make_is_refused_with_its_mode_untouched(tmp_path):
    """Pointed at `.`, --data-dir made a project folder 0700."""
    project = tmp_path / "project"
    project.mkdir()
    project.chmod(0o755)
    (project / "notes.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "palm_rlhf.feedback", "--data-dir", ".", "invite"], cwd=project,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1 and done.stderr == (
        f"the data folder {project} holds other files and no db.sqlite3 or secret_key: "
        "give a new or empty folder, or the one the app made before\n")
    assert oct(stat.S_IMODE(project.stat().st_mode)) == "0o755" and os.listdir(project) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    private_folder(empty)  # nothing of anyone's in it: made private for the database and key to come
    assert oct(stat.S_IMODE(empty.stat().st_mode)) == "0o700"
    with pytest.raises(ValueError, match="is a file"):
        private_folder(project / "notes.txt")


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["example.org", "ftp://example.org", "https://example.org/app", "http://x:70000"])
def test_invite_refuses_a_base_url_nobody_could_open(url):
    from palm_rlhf.feedback.models import Invite

    message = exit_message(lambda: cli.invite(cli.parse_args(["invite", "--base-url", url])))
    assert message == f"--base-url must look like https://feedback.example.org, not {url!r}"
    assert not Invite.objects.exists()
