"""Command line: python -m palm_rlhf.feedback (or palm-rlhf-feedback) COMMAND.

  serve     migrate, optionally import or start background sampling, then serve on a threaded server
  import    add responses, or pairs to compare, from a JSONL file
  generate  sample responses from a checkpoint in the foreground
  adduser   create a rater (--staff: sees stats and exports; --superuser: also every admin permission)
  invite    print a one-use sign-up link
  export    write ratings.jsonl / pairs.jsonl for train_reward.py and DPO
  manage    any Django management command, e.g. `manage createsuperuser`
"""
import argparse
import getpass
import os
import sys
from pathlib import Path


def setup_django(data_dir: str | None) -> None:
    if data_dir:
        os.environ["PALM_RLHF_FEEDBACK_DIR"] = data_dir
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "palm_rlhf.feedback.settings")
    try:
        import django
    except ImportError:
        sys.exit("The feedback app needs Django: pip install 'palm-rlhf[feedback]'")
    from django.conf import settings

    try:
        from .settings import private_folder

        private_folder(settings.DATA_DIR)  # the first look at settings imports them
    except ValueError as error:  # a setting or a folder that cannot work
        sys.exit(str(error))
    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


# The range of every number an option takes: one bin leaves no choice, no rater would see an item
# of overlap 0, a port is 16 bits (70000 listened on 4464), no thread would answer with 0 threads;
# the highest are what a column holds or more than anyone needs.
BOUNDS = {
    "num_bins": (2, 100),
    "overlap": (1, 1000),
    "samples": (1, 1000),
    "seq_len": (2, 65536),
    "temperature": (0, 100),
    "port": (1, 65535),
    "threads": (1, 1000),
    "max_body_size": (1024, 2**30),
}


def check_options(args) -> None:
    """One line, before anything is stored or served, for a number outside its range."""
    for name, (least, most) in BOUNDS.items():
        value = getattr(args, name, None)
        if value is not None and not least <= value <= most:  # NaN fails both comparisons
            sys.exit(f"--{name.replace('_', '-')} must be from {least} to {most}, not {value}")


def add_item_options(parser, sampling: bool) -> None:
    parser.add_argument("--num-bins", type=int, default=5, help="ratings run 1..K; match num_binned_output")
    parser.add_argument("--overlap", type=int, default=1, help="how many raters judge each item")
    if sampling:
        parser.add_argument("--checkpoint", help="folder with model.safetensors + config.json")
        parser.add_argument("--prompts", help="prompts: a text file (one a line) or JSONL with 'prompt'")
        parser.add_argument("--samples", type=int, default=4, help="responses sampled per prompt")
        parser.add_argument("--seq-len", type=int, default=256, help="prompt + response tokens")
        parser.add_argument("--temperature", type=float, default=1.0)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="palm-rlhf-feedback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder for db.sqlite3 and the secret key (default ./feedback_data)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the web app")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--threads", type=int, default=8, help="server worker threads")
    serve.add_argument("--max-body-size", type=int, default=2**20, metavar="BYTES",
                       help="refuse (413) a request whose body is this large or larger before reading it "
                            "(default 1 MiB; waitress's own is 1 GiB, buffered to disk)")
    serve.add_argument("--origin", help="public address raters open, e.g. https://feedback.example.org "
                                        "(or PALM_RLHF_FEEDBACK_ORIGIN)")
    serve.add_argument("--behind-proxy", action="store_true",
                       help="a reverse proxy in front sets X-Forwarded-Proto/-For (or PALM_RLHF_FEEDBACK_PROXY=1)")
    serve.add_argument("--import", dest="import_file", help="JSONL responses or pairs to import before serving")
    add_item_options(serve, sampling=True)

    imports = commands.add_parser("import", help="add responses or pairs from JSONL")
    imports.add_argument("file")
    add_item_options(imports, sampling=False)

    generate = commands.add_parser("generate", help="sample responses in the foreground")
    add_item_options(generate, sampling=True)

    # no abbreviations: `--password X` must not pass for `--password-file X`
    adduser = commands.add_parser("adduser", help="create an account", allow_abbrev=False)
    adduser.add_argument("username")
    adduser.add_argument("--staff", action="store_true", help="may see stats, tasks, exports and invites")
    adduser.add_argument("--superuser", action="store_true", help="staff with every permission in the admin")
    adduser.add_argument("--password-file", help="read the password from this file's first line ('-': stdin); "
                                                 "otherwise it is asked for without echo")

    invite = commands.add_parser("invite", help="print a one-use sign-up link")
    invite.add_argument("--staff", action="store_true")
    invite.add_argument("--base-url", help="default: PALM_RLHF_FEEDBACK_ORIGIN, else http://127.0.0.1:8000")

    export = commands.add_parser("export", help="write JSONL for train_reward.py / DPO")
    export.add_argument("--ratings", help='path for {"prompt", "response", "rating"} lines')
    export.add_argument("--pairs", help='path for {"prompt", "chosen", "rejected"} lines')

    manage = commands.add_parser("manage", help="a Django management command")
    manage.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    check_options(args)
    return args


def note_options(kept: int, source: str, args) -> None:
    """Say so when options are not applied: items already stored keep their own, and scales may mix."""
    from .tasks import rating_scales

    if kept:
        print(f"note: {kept} items from {source} were stored before with another --overlap or --num-bins and "
              f"keep theirs; --overlap {args.overlap} --num-bins {args.num_bins} apply to new items only")
    if len(scales := rating_scales()) > 1:
        print(f"note: the rating items use {len(scales)} scales ({', '.join(f'1..{k}' for k in scales)}); "
              "each exported rating carries its num_bins")


def start_sampling(args, background: bool) -> None:
    from .models import Item
    from .tasks import other_options, start_generation

    if bool(args.checkpoint) != bool(args.prompts):
        sys.exit("--checkpoint and --prompts go together")
    if args.checkpoint:
        sampled = Item.objects.filter(first__source=str(args.checkpoint))  # kept: sampling skips what it has
        note_options(sampled.filter(other_options(args.num_bins, args.overlap)).count(), args.checkpoint, args)
        start_generation(args.checkpoint, args.prompts, args.samples, args.num_bins, args.overlap,
                         args.seq_len, args.temperature, background=background)


def import_file(path: str, args) -> None:
    from .tasks import import_jsonl

    imported = import_jsonl(path, args.num_bins, args.overlap)
    print(f"imported {imported.made} items")
    note_options(imported.kept, path, args)


def generate(args) -> None:
    start_sampling(args, background=False)


def serve(args) -> None:
    try:
        from waitress import serve as waitress_serve
    except ImportError:
        sys.exit("serve needs waitress: pip install 'palm-rlhf[feedback]'")
    from django.conf import settings

    from .wsgi import application

    if args.import_file:
        import_file(args.import_file, args)
    start_sampling(args, background=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: waitress should sit behind a reverse proxy (nginx, Caddy) on 127.0.0.1: see docs/feedback.md")
    print(f"serving on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    # waitress drops X-Forwarded-* headers unless told otherwise; behind a proxy, Django reads them
    waitress_serve(application, host=args.host, port=args.port, threads=args.threads, ident="palm-rlhf-feedback",
                   max_request_body_size=args.max_body_size,
                   clear_untrusted_proxy_headers=not settings.FEEDBACK_BEHIND_PROXY)


def read_password(args, username: str) -> str:
    """From --password-file (never the command line, which `ps` and shell history show), or typed twice."""
    if args.password_file == "-":
        return sys.stdin.readline().rstrip("\r\n")
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as file:
            return file.readline().rstrip("\r\n")
    password = getpass.getpass(f"password for {username}: ")
    if getpass.getpass("the same again: ") != password:
        sys.exit("the two passwords differ")
    return password


def adduser(args) -> None:
    from django.contrib.auth import get_user_model
    from django.contrib.auth.password_validation import validate_password
    from django.core.exceptions import ValidationError
    from django.db import IntegrityError

    from .accounts import checked_username

    users = get_user_model()
    try:
        name = checked_username(args.username)
    except ValidationError as error:
        sys.exit(f"username refused: {error.messages[0]}")
    password = read_password(args, name)
    try:
        validate_password(password, users(username=name))
    except ValidationError as error:
        sys.exit("password refused: " + " ".join(error.messages))
    try:
        users.objects.create_user(name, password=password, is_staff=args.staff or args.superuser,
                                  is_superuser=args.superuser)
    except IntegrityError:  # made by someone else since the check above
        sys.exit(f"username refused: a user named {name!r} exists already")
    role = "superuser" if args.superuser else "staff" if args.staff else "rater"
    print(f"created {role} {name}")


def invite(args) -> None:
    from django.conf import settings
    from django.urls import reverse

    from .models import Invite
    from .settings import checked_origin

    base_url = args.base_url or settings.FEEDBACK_ORIGIN or "http://127.0.0.1:8000"
    try:
        checked_origin(base_url, "--base-url")
    except ValueError as error:  # before the invite is made: a link nobody can open is no invite
        sys.exit(str(error))
    token = Invite.objects.create(is_staff=args.staff).token
    print(base_url.rstrip("/") + reverse("accept_invite", args=[token]))


def export(args) -> None:
    from .export import pair_records, rating_records, write_jsonl

    if not (args.ratings or args.pairs):
        sys.exit("give --ratings PATH and/or --pairs PATH")
    for path, records in ((args.ratings, rating_records), (args.pairs, pair_records)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            print(f"wrote {write_jsonl(records(), path)} lines to {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "serve":  # read by the settings module, which setup_django imports
        if args.origin:
            os.environ["PALM_RLHF_FEEDBACK_ORIGIN"] = args.origin
        if args.behind_proxy:
            os.environ["PALM_RLHF_FEEDBACK_PROXY"] = "1"
    setup_django(args.data_dir)
    if args.command == "manage":
        from django.core.management import execute_from_command_line

        if args.args[:1] == ["createsuperuser"]:  # it would skip the username checks of accounts.py
            sys.exit("use `adduser NAME --superuser`: every account is made with the same username checks")

        execute_from_command_line(["palm-rlhf-feedback manage", *args.args])
        return
    migrate()
    from .export import BadFile

    commands = {"serve": serve, "import": lambda args: import_file(args.file, args), "generate": generate,
                "adduser": adduser, "invite": invite, "export": export}
    try:
        commands[args.command](args)
    except BadFile as error:  # which file and line is wrong, instead of a traceback
        sys.exit(str(error))


if __name__ == "__main__":
    main()
