"""Backend choice shared by the attention ops: Triton on CUDA, the PyTorch reference on CPU."""
import os

BACKENDS = ('triton', 'reference', 'natten')


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


def resolve_backend(op_name, backend, tensor, allowed=('triton', 'reference')):
    """Returns the backend that ``op_name`` runs on for ``tensor``.

    ``backend=None`` picks Triton for CUDA tensors and the reference elsewhere. A forced
    ``'triton'`` on a CPU tensor is only possible under the Triton interpreter.
    """
    if backend is None:
        return 'triton' if tensor.is_cuda else 'reference'
    if backend not in allowed:
        raise ValueError(f'{op_name}: unknown backend {backend!r}; choose one of {allowed} or None (automatic)')
    if backend == 'triton' and not tensor.is_cuda and not triton_interpreted():
        raise RuntimeError(
            f'{op_name}: backend="triton" needs CUDA tensors, or TRITON_INTERPRET=1 set before triton '
            f'is imported to run the kernels on CPU; use backend="reference" (or None) for CPU tensors')
    return backend
