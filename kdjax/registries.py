"""What registering a name twice means, for every name registry (models, loss terms).

Registering a name again from the file that registered it replaces the entry: that file ran again (main.py runs a
config file a second time to explain a flag error, and a config may define its own model or loss term). From
another file it is a `ValueError`: two definitions fighting over one name, which must not be settled by import
order.
"""
import sys


def caller_file(depth: int = 1) -> str:
  """The source file of the function `depth` frames above the caller of this one."""
  return sys._getframe(depth + 1).f_code.co_filename


def add(registry: dict, origins: dict, name: str, value, *, what: str, origin: str) -> None:
  """`registry[name] = value`, registered from the file `origin` (kept in `origins`)."""
  if name in registry and origins.get(name) != origin:
    raise ValueError(f'{what} {name!r} is registered twice: in {origins.get(name)} and in {origin}')
  registry[name] = value
  origins[name] = origin
