"""The one error type of the evaluation tools."""


class EvaluationError(ValueError):
    """Input the evaluation cannot work with (a missing folder, an unreadable image, a model that cannot be
    loaded offline, ...). The message says what was wrong and which argument or flag fixes it."""


class EvaluationWarning(UserWarning):
    """A result that is valid but easy to misread (e.g. FID on fewer images than feature dimensions)."""
