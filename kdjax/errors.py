"""User-facing errors.

A `UserError` is a mistake the user can fix (a wrong config key, a missing dataset, a teacher checkpoint that does
not fit). `main.py` prints its message as one line and exits with status 2 instead of a traceback, so every message
must say what is wrong *and* how to fix it.
"""


class UserError(Exception):
  """An error caused by user input; its message names the fix."""


class NonFiniteError(UserError):
  """A run stopped at a NaN/Inf loss or gradient (config nonfinite='stop'): the config's recipe diverges."""
