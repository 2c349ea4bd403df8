"""`tctl lint`: check a policy repository before it is pushed, or in CI.

Registers the `lint` subcommand (see `control.tctl`). The work is in `control.lint`; this
module only maps the command line onto it and turns unreadable input into exit code 2.
It never changes the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from control.lint import FORMATTERS, JSON_FORMAT, LintInputError, lint_directory, lint_revision
from control.tctl import UsageError

DESCRIPTION = """\
Check a policy repository: YAML syntax, every field of every role, user, database and the
cluster, and the links between them (users naming roles that exist, unique names, one
cluster.yaml). Each problem is printed with the file, line and column to fix.

The repository layout:
  cluster.yaml              the cluster (exactly one, at the root)
  roles/**/*.yaml           kind: role   (version v5)
  users/**/*.yaml           kind: user   (version v2)
  databases/**/*.yaml       kind: db     (version v3)
Files may hold several resources separated by ---; other files are ignored.

Without --rev, PATH is read as it is on disk. With --rev, PATH is a git repository (or a
folder inside one) and the tree of that commit is linted instead: uncommitted changes and
later commits are ignored, exactly as the control plane sees a commit.
"""

EPILOG = f"""\
output formats (--format):
  text    one problem per line, path:line:col: severity: KIND/NAME: field: message,
          then a summary such as "2 errors, 1 warning in 14 files"
  json    {{"format": "{JSON_FORMAT}", "source": {{"path", "rev", "commit"}},
           "summary": {{"files", "errors", "warnings"}}, "problems": [{{"path", "line",
           "col", "severity", "rule", "resource", "field", "message"}}]}}
  github  GitHub Actions annotations (::error file=...,line=...,col=...::message),
          shown inline on the pull request
  sarif   SARIF 2.1.0, for code scanning dashboards (e.g. github/codeql-action/upload-sarif)

exit status:
  0  no errors (warnings allowed unless --strict)
  1  errors found (or warnings, with --strict)
  2  usage error, or PATH / the revision cannot be read

examples:
  tctl lint                              lint the repository in the current directory
  tctl lint policies/                    lint the folder policies/
  tctl lint --strict policies/           fail on warnings too
  tctl lint --rev HEAD~1 .               lint the previous commit, not the working tree
  tctl lint --rev origin/main policies/  lint policies/ as it is on origin/main
  tctl lint --format github policies/    annotate a GitHub Actions run
  tctl lint --format sarif . > lint.sarif
"""


def run(args: argparse.Namespace) -> int:
    try:
        if args.rev is not None:
            report = lint_revision(args.path, args.rev)
        else:
            report = lint_directory(args.path)
    except LintInputError as exc:
        raise UsageError(str(exc)) from None
    try:
        sys.stdout.write(FORMATTERS[args.format](report))
        sys.stdout.flush()
    except BrokenPipeError:  # `tctl lint | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return report.exit_code(strict=args.strict)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lint",
        help="check a policy repository (a directory, or a git commit with --rev)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "path",
        metavar="PATH",
        nargs="?",
        default=".",
        help="the policy repository (default: the current directory)",
    )
    parser.add_argument(
        "--rev",
        metavar="REV",
        help="lint the tree of this commit (branch, tag, HEAD~1, commit id) instead of "
        "the files on disk",
    )
    parser.add_argument(
        "--format",
        choices=sorted(FORMATTERS),
        default="text",
        help="output format (default: text; see below)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 on warnings as well as on errors",
    )
    parser.set_defaults(func=run)
