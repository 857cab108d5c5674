"""The errors of evaluation (a leaf module: nothing from bench is imported here, so every module of
bench.eval and its callers can raise and catch them without an import loop; docs/architecture.md)."""


class EvalError(ValueError):
    """An evaluation that cannot run as configured. The message is one line naming the key to fix."""


class ClassifierError(EvalError):
    """A classifier that cannot be trained or loaded; the message (one line) says what to do."""
