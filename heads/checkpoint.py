"""Loading OpenMMLab checkpoints safely: ``torch.load(weights_only=True)`` with exactly the types they hold.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; torch >= 2.6 then restricts unpickling to
tensors and plain containers, and a checkpoint written by mmengine's own ``Runner`` no longer loads
(``Unsupported global: mmengine.logging.history_buffer.HistoryBuffer``), so ``resume`` and ``load_from``
fail. Switching the restriction off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) would let a crafted checkpoint
run code. Instead, :func:`allow_openmmlab_checkpoints` (run when ``attnzoo.heads`` is imported, which every
attnzoo config does through ``custom_imports``) allow-lists what mmengine / mmdet / mmseg checkpoints hold
besides tensors and containers:

* the message hub's ``HistoryBuffer`` objects (logged scalars) with their numpy arrays, and the statistics
  methods a buffer keeps, which pickle as ``getattr(HistoryBuffer, 'mean')``: ``getattr`` itself is not
  allowed, a stand-in resolves only those methods;
* numpy scalars (the ETA in the runtime info) and the numeric numpy dtypes of arrays and scalars, under the
  module names numpy 1 and numpy 2 write.

It also makes mmengine's loader of local files pass ``weights_only=True`` explicitly (no environment
variable can turn it off), turns a refused object into :class:`UnsafeCheckpointError`, which names it, and
verifies the file first (damaged or empty files and non-finite weights are refused with a
:class:`~attnzoo.backbones._checkpoint.CheckpointError`).
"""
import os
import pickle

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from attnzoo.backbones._checkpoint import (
    UnsafeCheckpointError, refuse_nonfinite_tensors, unsafe_checkpoint_error, verify_checkpoint_archive)

try:
    from numpy._core import multiarray as _multiarray  # numpy 2
except ImportError:  # numpy 1
    from numpy.core import multiarray as _multiarray

__all__ = ['UnsafeCheckpointError', 'allow_openmmlab_checkpoints', 'load_from_local', 'OPENMMLAB_CHECKPOINT_GLOBALS']

# numpy's array and scalar constructors, under the module name each numpy major version pickles them with
_NUMPY_MODULES = ('numpy.core.multiarray', 'numpy._core.multiarray')
_NUMPY_NUMERIC_TYPES = (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.complex64, np.complex128)


# what HistoryBuffer._set_default_statistics puts in every buffer's table of statistics methods
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_statistic(owner, name: str):
    """Stands in for ``builtins.getattr`` while unpickling: resolves the statistics methods every
    ``HistoryBuffer`` keeps (its class attributes ``min``, ``max``, ``current``, ``mean``) and nothing else."""
    if owner is not HistoryBuffer or name not in _HISTORY_BUFFER_STATISTICS:
        raise UnsafeCheckpointError(
            f'getattr({owner!r}, {name!r}): only the statistics methods {_HISTORY_BUFFER_STATISTICS} of '
            f'mmengine\'s HistoryBuffer are allowed')
    return getattr(HistoryBuffer, name)


OPENMMLAB_CHECKPOINT_GLOBALS = [
    HistoryBuffer,
    (_history_buffer_statistic, 'builtins.getattr'),
    (_history_buffer_statistic, '__builtin__.getattr'),  # what pickle protocol 2 writes for builtins
    np.ndarray,
    np.dtype,
    *{type(np.dtype(t)) for t in _NUMPY_NUMERIC_TYPES},
    *[(_multiarray._reconstruct, f'{module}._reconstruct') for module in _NUMPY_MODULES],
    *[(_multiarray.scalar, f'{module}.scalar') for module in _NUMPY_MODULES],
]


def load_from_local(filename: str, map_location=None):
    """mmengine's loader of local checkpoint files, with ``weights_only=True`` and a clear refusal; the file is
    verified as every attnzoo loader verifies it (CRCs and sizes before, finite values after)."""
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    verify_checkpoint_archive(filename)
    try:
        checkpoint = torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:  # torch re-raises every refusal (ours included) as one
        raise unsafe_checkpoint_error(filename, error, 'mmengine / mmdet / mmseg checkpoints') from error
    refuse_nonfinite_tensors(checkpoint, filename)
    return checkpoint


def allow_openmmlab_checkpoints() -> None:
    """Allow-lists the types of OpenMMLab checkpoints for ``torch.load(weights_only=True)`` and installs
    :func:`load_from_local` as mmengine's loader of local files. Idempotent."""
    torch.serialization.add_safe_globals(OPENMMLAB_CHECKPOINT_GLOBALS)
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
