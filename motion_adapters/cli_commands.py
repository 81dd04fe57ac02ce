"""The `motion-adapters` subcommands that drive pipelines and the Hub: train, generate, push, eval."""

from __future__ import annotations

import argparse

EXIT_OK = 0


def add_commands(sub) -> None:
    """Register the pipeline and Hub subcommands on the CLI's subparsers."""
    push = sub.add_parser("push", help="upload a motion folder to the Hugging Face Hub")
    push.add_argument("folder", help="a motion folder written by train")
    push.add_argument("repo_id", help="the Hub repository, e.g. user/seagull-walk")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--token", default=None, help="a write token (default: the logged-in one)")
    push.add_argument("--message", default=None, help="the commit message")
    push.set_defaults(func=_cmd_push)


def _cmd_push(args: argparse.Namespace) -> int:
    from motion_adapters.hub import push_motion_to_hub

    url = push_motion_to_hub(
        args.folder, args.repo_id, token=args.token, private=args.private or None, commit_message=args.message
    )
    print(url)
    return EXIT_OK
