"""User-facing errors: one line, naming the problem, exit code 2."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, files, arguments).

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    """

    exit_code = 2


class ConfigError(UserError):
    """An invalid run configuration; the message names the key path."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or inf during training."""
