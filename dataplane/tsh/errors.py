"""How `tsh` commands fail: one exception type, and the wrapper that turns failures into a
message on stderr and an exit code.

Exit codes: 0 success; 1 the cluster said no or the state is wrong (wrong password, locked
account, access denied, expired session, not logged in); 2 usage and I/O problems (a file
that cannot be written, a proxy that cannot be reached or is not trusted); 130 interrupted.

A person never sees a traceback for something that is not a bug in tsh, and never sees a
password, TOTP code, signup token or private key in a message.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from transport.http import ApiError, HttpError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

SESSION_EXPIRED = "your session has expired, run tsh login"


class TshError(Exception):
    """A failure a person can act on; `str()` says what was wrong and what to do next."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(TshError):
    """Bad arguments or local files that cannot be read or written: exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


def fail(message: str) -> int:
    print(f"tsh: error: {message}", file=sys.stderr)
    return EXIT_REFUSED


Command = Callable[[argparse.Namespace], int]


def command(run: Command) -> Command:
    """Wrap a subcommand: known failures become `tsh: error: ...` and an exit code."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except TshError as exc:
            print(f"tsh: error: {exc}", file=sys.stderr)
            return exc.exit_code
        except ApiError as exc:
            print(f"tsh: error: {exc.message}", file=sys.stderr)
            return EXIT_REFUSED
        except HttpError as exc:
            print(f"tsh: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader of our output went away (`tsh db ls | head`): nothing to say.
            return EXIT_USAGE
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            print(
                f"tsh: error: {where}{exc.strerror or exc}; check that the file or directory "
                "exists and that you may write to it",
                file=sys.stderr,
            )
            return EXIT_USAGE

    return wrapped
