"""attnzoo.kernels: attention ops with a fused Triton path and a PyTorch reference of the same signature.

Each op is registered with ``torch.library`` (``torch.ops.attnzoo.neighborhood_attention_2d``,
``torch.ops.attnzoo.routing_attention``), so ``torch.compile``, TorchScript and FX see one op.
What runs when no backend is named: the Triton kernels on CUDA tensors, the ops' CPU kernels
(``_neighborhood_cpu``, ``_routing_cpu``: tiles / whole regions on PyTorch's fused CPU attention,
backward written out) on CPU tensors; ``backend="reference"`` runs the reference anywhere.
:func:`use_backend` / :func:`set_backend` (or ``ATTNZOO_KERNEL_BACKEND=reference``) switch every
call that does not name a backend, models included, to the plain PyTorch reference. :func:`use_na_kernel` /
:func:`set_na_kernel` (or ``ATTNZOO_NA_KERNEL=v1|v2``) pick the version of the Triton neighborhood-attention
kernels. ``torch.onnx.export(..., dynamo=True)`` translates the ops through their references (``_onnx.py``).
"""
from ._dispatch import get_backend, get_na_kernel, set_backend, set_na_kernel, use_backend, use_na_kernel
from .neighborhood import neighborhood_attention_2d
from .routing import routing_attention, routing_region_index
from . import _onnx  # noqa: F401,E402  the ops' ONNX translation (decompositions torch.onnx takes)

__all__ = ['neighborhood_attention_2d', 'routing_attention', 'routing_region_index', 'get_backend', 'set_backend',
           'use_backend', 'get_na_kernel', 'set_na_kernel', 'use_na_kernel']
