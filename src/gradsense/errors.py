"""The one exception type the package raises for bad input; its message is a single line naming the problem."""


class GradsenseError(ValueError):
    """A user-facing error: one line, naming the file, model, item or parameter at fault."""
