"""Errors a user can fix: bad recipes, bad data, bad paths.

Every such error is an `AdapterkitError`. The CLI prints its problems together, without a
traceback, and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass
class Problem:
    """One thing wrong with the user's input.

    `where` names the place (``recipe.yaml:12``, ``override train.lr=abc``, ``train.jsonl:40``),
    `key` the dotted recipe key or the data field, `message` what is wrong (with the bad value),
    `fix` what to do instead.
    """

    where: str
    message: str
    key: str | None = None
    fix: str | None = None

    def __str__(self) -> str:
        head = f"{self.where}: " if self.where else ""
        if self.key:
            head += f"{self.key}: "
        text = head + self.message
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


class AdapterkitError(Exception):
    """A problem with the user's input, reported together and without a traceback."""

    exit_code = 2

    def __init__(self, problems: Problem | str | Iterable[Problem], title: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(where="", message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        lines = []
        if self.title:
            lines.append(self.title)
        elif len(self.problems) > 1:
            lines.append(f"{len(self.problems)} problems:")
        for p in self.problems:
            text = str(p)
            lines.append(f"  - {text}" if len(self.problems) > 1 or self.title else text)
        return "\n".join(lines)


class ConfigError(AdapterkitError):
    """The recipe (file or overrides) is invalid."""


class DataError(AdapterkitError):
    """A data file is missing, malformed or does not fit the task."""


class TrainingStopped(AdapterkitError):
    """A guard stopped training (non-finite loss or gradients); the last good checkpoint is kept."""

    exit_code = 3


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice to `word`, phrased as a suggestion, or None."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None


class Interrupted(BaseException):
    """A termination signal (SIGTERM, SIGHUP) turned into the same clean stop as Ctrl-C. Not a
    KeyboardInterrupt, so that the CLI can exit with the signal's own code (typer maps Ctrl-C to 130)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
