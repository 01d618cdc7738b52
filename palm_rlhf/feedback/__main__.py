"""Command line: python -m palm_rlhf.feedback (or palm-rlhf-feedback) COMMAND.

  serve     migrate, optionally import or start background sampling, then serve on a threaded server
  import    add responses from a JSONL file
  generate  sample responses from a checkpoint in the foreground
  adduser   create a rater (or, with --staff, someone who sees stats and exports)
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

    settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


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
    serve.add_argument("--import", dest="import_file", help="JSONL responses to import before serving")
    add_item_options(serve, sampling=True)

    imports = commands.add_parser("import", help="add responses from JSONL")
    imports.add_argument("file")
    add_item_options(imports, sampling=False)

    generate = commands.add_parser("generate", help="sample responses in the foreground")
    add_item_options(generate, sampling=True)

    adduser = commands.add_parser("adduser", help="create an account")
    adduser.add_argument("username")
    adduser.add_argument("--staff", action="store_true", help="may see stats, tasks, exports and the admin")
    adduser.add_argument("--password", help="asked for when left out")

    invite = commands.add_parser("invite", help="print a one-use sign-up link")
    invite.add_argument("--staff", action="store_true")
    invite.add_argument("--base-url", default="http://127.0.0.1:8000")

    export = commands.add_parser("export", help="write JSONL for train_reward.py / DPO")
    export.add_argument("--ratings", help='path for {"prompt", "response", "rating"} lines')
    export.add_argument("--pairs", help='path for {"prompt", "chosen", "rejected"} lines')

    manage = commands.add_parser("manage", help="a Django management command")
    manage.add_argument("args", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def start_sampling(args, background: bool) -> None:
    from .tasks import start_generation

    if bool(args.checkpoint) != bool(args.prompts):
        sys.exit("--checkpoint and --prompts go together")
    if args.checkpoint:
        start_generation(args.checkpoint, args.prompts, args.samples, args.num_bins, args.overlap,
                         args.seq_len, args.temperature, background=background)


def serve(args) -> None:
    try:
        from waitress import serve as waitress_serve
    except ImportError:
        sys.exit("serve needs waitress: pip install 'palm-rlhf[feedback]'")
    from .tasks import import_jsonl
    from .wsgi import application

    if args.import_file:
        print(f"imported {import_jsonl(args.import_file, args.num_bins, args.overlap)} items")
    start_sampling(args, background=True)
    print(f"serving on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    waitress_serve(application, host=args.host, port=args.port, threads=args.threads, ident="palm-rlhf-feedback")


def adduser(args) -> None:
    from django.contrib.auth import get_user_model

    password = args.password or getpass.getpass(f"password for {args.username}: ")
    get_user_model().objects.create_user(args.username, password=password, is_staff=args.staff,
                                         is_superuser=args.staff)
    print(f"created {'staff' if args.staff else 'rater'} {args.username}")


def invite(args) -> None:
    from django.urls import reverse

    from .models import Invite

    token = Invite.objects.create(is_staff=args.staff).token
    print(args.base_url.rstrip("/") + reverse("accept_invite", args=[token]))


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
    setup_django(args.data_dir)
    if args.command == "manage":
        from django.core.management import execute_from_command_line

        execute_from_command_line(["palm-rlhf-feedback manage", *args.args])
        return
    migrate()
    if args.command == "serve":
        serve(args)
    elif args.command == "import":
        from .tasks import import_jsonl

        print(f"imported {import_jsonl(args.file, args.num_bins, args.overlap)} items")
    elif args.command == "generate":
        start_sampling(args, background=False)
    else:
        {"adduser": adduser, "invite": invite, "export": export}[args.command](args)


if __name__ == "__main__":
    main()
