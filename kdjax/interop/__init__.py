"""Bridges from other frameworks' checkpoints to kdjax models (today: PyTorch, in `torch_import`).

The names are resolved on first use rather than imported here: `python -m kdjax.interop.torch_import` would otherwise
find its own module already imported by this package and run it twice (runpy warns about exactly that).
"""

import importlib

# public name -> submodule that defines it
_EXPORTS = {
  'FAMILIES': 'torch_import',
  'convert_state_dict': 'torch_import',
  'from_torch_module': 'torch_import',
  'load_torch_checkpoint': 'torch_import',
  'save_as_teacher_run': 'torch_import',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
