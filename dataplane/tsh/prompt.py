"""Asking a person for secrets: passwords and TOTP codes.

On a terminal the answer is read with `getpass` (not echoed); when standard input is not a
terminal (a script, `echo pw | tsh login`, a test), each answer is one line of standard
input, read in the order the questions are asked, and the question goes to stderr so that
standard output stays clean.

Never echoes, logs or stores what it reads.
"""

from __future__ import annotations

import getpass
import sys
from typing import TextIO

from dataplane.tsh.errors import TshError


class Prompter:
    """Reads answers from the terminal, or line by line from `stdin` when it is not one."""

    def __init__(self, stdin: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self._stdin = stdin
        self._stderr = stderr

    @property
    def stdin(self) -> TextIO:
        return self._stdin if self._stdin is not None else sys.stdin

    @property
    def stderr(self) -> TextIO:
        return self._stderr if self._stderr is not None else sys.stderr

    @property
    def interactive(self) -> bool:
        try:
            return self.stdin.isatty()
        except (AttributeError, ValueError):
            return False

    def secret(self, question: str, what: str, allow_empty: bool = False) -> str:
        """One answer, without its line ending; `what` names it in errors ("password")."""
        if self.interactive:
            answer = getpass.getpass(question, stream=self.stderr)
        else:
            print(question, end="", file=self.stderr, flush=True)
            line = self.stdin.readline()
            print(file=self.stderr)
            if not line:
                raise TshError(
                    f"no {what} on standard input: type it on a terminal, or give it as one "
                    "line of standard input"
                )
            answer = line.rstrip("\r\n")
        if not answer and not allow_empty:
            raise TshError(f"the {what} is empty; nothing was sent")
        return answer

    def new_password(self, user: str) -> str:
        """A new password; on a terminal it is asked twice and must match."""
        first = self.secret(f"Choose a password for {user}: ", "new password")
        if self.interactive:
            again = self.secret("Type it again: ", "new password")
            if again != first:
                raise TshError("the two passwords differ; run the command again")
        return first

    def totp(self, question: str = "Enter the code from your authenticator app: ") -> str:
        return self.secret(question, "TOTP code").strip().replace(" ", "")
