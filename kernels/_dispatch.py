"""What the attention ops share: the choice of implementation (with the process-wide switch), the
``attnzoo`` operator library, and the autocast rule of the registered ops.

Implementations of an op:

- ``"triton"``: the fused Triton kernels (CUDA; CPU only under ``TRITON_INTERPRET=1``);
- ``"cpu"``: the op's CPU kernels (what ``backend=None`` runs for CPU tensors; not a user choice);
- ``"reference"``: the plain PyTorch reference, traced and differentiated like any PyTorch code;
- ``"natten"``: ``natten.na2d`` (neighborhood attention only).

The Triton kernels of neighborhood attention come in two versions, ``"v1"`` (``_neighborhood_triton``,
the default) and ``"v2"`` (``_neighborhood_triton_v2``, banded); :func:`set_na_kernel` /
:func:`use_na_kernel` or ``ATTNZOO_NA_KERNEL`` pick one until a GPU measurement picks the default.

``backend=None`` in a call means the process-wide default set by :func:`set_backend` /
:func:`use_backend` or the ``ATTNZOO_KERNEL_BACKEND`` environment variable, and when none is set,
``"triton"`` for CUDA tensors and ``"cpu"`` for others. An explicit ``backend=`` argument wins.
"""
import contextlib
import os
from typing import Optional

import torch

ENV_VAR = 'ATTNZOO_KERNEL_BACKEND'
SWITCH_BACKENDS = ('triton', 'reference')


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def _checked_switch(value, source):
    if value is not None and value not in SWITCH_BACKENDS:
        raise ValueError(f'{source}: unknown kernel backend {value!r}; choose one of {SWITCH_BACKENDS} or None '
                         f'(automatic: Triton on CUDA, the CPU kernels on CPU)')
    return value


_default_backend = _checked_switch(os.environ.get(ENV_VAR) or None, f'environment variable {ENV_VAR}')


def get_backend() -> Optional[str]:
    """The process-wide backend of calls that pass ``backend=None`` (None: automatic per device)."""
    return _default_backend


def set_backend(backend: Optional[str]) -> None:
    """Sets the backend of every attention call that passes ``backend=None``, models included.

    ``"reference"`` runs the plain PyTorch reference everywhere (the fused path off); ``"triton"``
    forces the Triton kernels (CPU tensors need ``TRITON_INTERPRET=1``); None restores the automatic
    choice. The environment variable ``ATTNZOO_KERNEL_BACKEND`` sets the initial value.
    """
    global _default_backend
    _default_backend = _checked_switch(backend, 'set_backend')


@contextlib.contextmanager
def use_backend(backend: Optional[str]):
    """Context manager form of :func:`set_backend`; restores the previous default on exit."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def requested_backend(op_name: str, backend: Optional[str], allowed=('triton', 'reference')) -> Optional[str]:
    """The backend a Python call asks for: its own argument, else the process-wide default (may be None)."""
    if backend is None:
        backend = _default_backend
    if backend is not None and backend not in allowed:
        raise ValueError(f'{op_name}: unknown backend {backend!r}; choose one of {allowed} or None (automatic)')
    return backend


def device_backend(op_name: str, backend: Optional[str], device: torch.device) -> str:
    """The implementation that runs on ``device``: None becomes the default, then Triton (CUDA) or the CPU
    kernels (elsewhere). Triton on a CPU tensor is only possible under the Triton interpreter."""
    backend = requested_backend(op_name, backend, allowed=('triton', 'reference', 'natten', 'cpu'))
    if backend is None:
        return 'triton' if device.type == 'cuda' else 'cpu'
    if backend == 'triton' and device.type != 'cuda' and not triton_interpreted():
        raise RuntimeError(
            f'{op_name}: backend="triton" needs CUDA tensors, or TRITON_INTERPRET=1 set before triton '
            f'is imported to run the kernels on CPU; use backend="reference" (or None) for CPU tensors')
    if backend == 'cpu' and device.type != 'cpu':
        raise ValueError(f'{op_name}: the "cpu" kernels take CPU tensors, got {device}; use backend=None')
    return backend


# ----------------------------------------------------------------------------- neighborhood kernel version

NA_KERNEL_ENV_VAR = 'ATTNZOO_NA_KERNEL'
NA_KERNELS = ('v1', 'v2')


def _checked_na_kernel(value, source):
    if value not in NA_KERNELS:
        raise ValueError(f'{source}: unknown neighborhood-attention kernel {value!r}; choose one of {NA_KERNELS}')
    return value


_na_kernel = _checked_na_kernel(os.environ.get(NA_KERNEL_ENV_VAR) or 'v1', f'environment variable {NA_KERNEL_ENV_VAR}')


def get_na_kernel() -> str:
    """The version of the Triton neighborhood-attention kernels that ``backend="triton"`` runs."""
    return _na_kernel


def set_na_kernel(version: str) -> None:
    """Picks the Triton neighborhood-attention kernels, forward and backward: ``"v1"`` (tile and halo blocks,
    online softmax) or ``"v2"`` (banded, one exact softmax pass). ``ATTNZOO_NA_KERNEL`` sets the initial
    value. Read when the registered ops run, so compiled models follow it without recompiling; an eager
    backward runs the version of its forward."""
    global _na_kernel
    _na_kernel = _checked_na_kernel(version, 'set_na_kernel')


@contextlib.contextmanager
def use_na_kernel(version: str):
    """Context manager form of :func:`set_na_kernel`; restores the previous version on exit."""
    previous = get_na_kernel()
    set_na_kernel(version)
    try:
        yield
    finally:
        set_na_kernel(previous)


# ----------------------------------------------------------------------------- Triton launches

MAX_GRID_YZ = 65535        # programs along a CUDA grid's y and z axes (x takes 2**31 - 1)
INT32_LIMIT = 2 ** 31


def check_heads_fit_grid(op_name: str, heads: int):
    if heads > MAX_GRID_YZ:
        raise ValueError(f'{op_name}: {heads} heads exceed the {MAX_GRID_YZ} programs of a CUDA grid axis; '
                         f'use fewer heads or backend="reference"')


def batch_chunks(op_name: str, batch: int, per_image: int):
    """Slices of the batch whose ``len * per_image`` programs fit one grid axis (y or z); one slice when
    the whole batch fits. ``per_image`` is 1 (batch alone on the axis) or the heads (batch * heads)."""
    check_heads_fit_grid(op_name, per_image)
    step = MAX_GRID_YZ // per_image
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def needs_wide_offsets(*tensors) -> bool:
    """True when one image of a tensor (everything but the batch axis, whose offset is always 64-bit)
    spans 2**31 elements or more, so element offsets inside it need 64-bit arithmetic."""
    return any(sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:])) >= INT32_LIMIT
               for t in tensors if t is not None)


def dot_precision(dtype: torch.dtype):
    """``input_precision`` of the kernels' ``tl.dot``: for float32, TF32 only where torch's float32 matmul
    setting allows it for ``torch.matmul`` (never in the interpreter), IEEE otherwise; None (Triton's
    default, the only choice) for 16-bit inputs."""
    if dtype != torch.float32:
        return None
    if torch.get_float32_matmul_precision() != 'highest' and not triton_interpreted():
        return 'tf32'
    return 'ieee'


# ----------------------------------------------------------------------------- registered ops

LIBRARY = torch.library.Library('attnzoo', 'FRAGMENT')   # the public ops are defined here by schema
AUTOCAST_DEVICES = ('cpu', 'cuda')


def _autocast_cast(value, dtype, keep_float32):
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return value   # integers, float64 and non-tensors pass unchanged, as in autocast's own rule
    return value.to(torch.float32 if keep_float32 else dtype)


def register_autocast(name: str, cast: tuple, keep_float32: tuple = ()):
    """Autocast rule of the public op ``attnzoo::<name>``: under ``torch.autocast`` the arguments at the
    positions ``cast`` (q, k, v, ...) go to the autocast dtype, those at ``keep_float32`` (biases) to
    float32, so float32 and low-precision inputs may be mixed as with any autocast op."""
    op = getattr(torch.ops.attnzoo, name).default
    for device_type in AUTOCAST_DEVICES:
        key = 'Autocast' + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, device_type=device_type, excluded=excluded):
            dtype = torch.get_autocast_dtype(device_type)
            args = [_autocast_cast(a, dtype, i in keep_float32) if i in cast or i in keep_float32 else a
                    for i, a in enumerate(args)]
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*args)

        LIBRARY.impl(name, kernel, key)
