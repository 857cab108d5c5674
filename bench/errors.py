"""Which exceptions are the user's bad input (one line on stderr, exit 2) rather than a fault: THE list,
read by the CLI and by the ranks of a multi-process run (bench/train/ranks.py). Torch-free: a class is
checked only when its module is already loaded, so bad input never imports torch.
"""
from __future__ import annotations

import sys

USER_ERRORS = (("bench.config", "ConfigError"), ("bench.data.format", "DataError"),
               ("bench.models.checks", "ModelConfigError"), ("bench.eval.errors", "EvalError"),
               ("bench.rundir", "RunLocked"), ("bench.errors", "UsageError"))


class UsageError(ValueError):
    """A command's arguments are wrong (bench <command> ...): one line, exit 2."""


_FAILED = False  # something in this process failed (process_failed); read at exit by ranks.Ranks.leave


def process_failed() -> None:
    """Something in this process failed: an exception left a command or a Slurm job's run, or a rank broke
    (ranks.Ranks.broken). The exit hook that destroys process groups (bench/train/ranks.py, Ranks.leave) then
    does not run, since a hung peer's pending collective would be waited for."""
    global _FAILED
    _FAILED = True


def failed_in_process() -> bool:
    """process_failed() was called in this process."""
    return _FAILED


def is_user_error(exc: BaseException) -> bool:
    """`exc` is bad input: one of USER_ERRORS, or another rank's bad input (ranks.RankFailed.user_error)."""
    if getattr(exc, "user_error", False) is True:
        return True
    loaded = tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules)
    return bool(loaded) and isinstance(exc, loaded)
