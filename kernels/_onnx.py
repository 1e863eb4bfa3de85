"""The ONNX translation of the attnzoo ops: decompositions into the references' standard ops.

``torch.onnx.export(model, ..., dynamo=True)`` traces a model with ``torch.export``, where the public ops
(``attnzoo::neighborhood_attention_2d``, ``attnzoo::routing_attention``, ``attnzoo::routing_region_index``,
CompositeImplicitAutograd) dissolve into their argument checks and the kernels' ``*_forward`` custom ops, then
decomposes every op that has no ONNX function with the decompositions of ``torch._decomp.decomposition_table``.
Registered there, the ``*_forward`` ops become their PyTorch references' gathers, einsums and softmax
(the ground truth of the tests, plain ops of ONNX opset 18), written for symbolic batch and map sizes, so the
graph is dynamic where the model is; ``routing_region_index`` is already plain ops (means, matmul, TopK).
Nothing else reads this table's entries for these ops: ``torch.compile`` and ``torch.export`` keep the custom
ops (and their fused kernels) unless asked to decompose them (:data:`DECOMPOSITIONS`).

The ONNX graph computes what the reference computes: every query's window gathered (memory grows with
``kernel_size ** 2``), borders, rpb, dilation, extra tokens, ``extra_bias`` and ``window_weight`` included.
"""
import torch
from torch._decomp import register_decomposition

from . import neighborhood, routing


@register_decomposition(torch.ops.attnzoo.neighborhood_attention_2d_forward.default)
def neighborhood_attention_2d_forward(q, k, v, kernel_size, dilation, scale, rpb, border, extra_k, extra_v, backend,
                                      extra_bias=None, window_weight=None):
    """``(out, lse)`` of checked arguments, as the fused and CPU kernels return them, by the reference."""
    spec = neighborhood.NeighborhoodSpec(tuple(kernel_size), tuple(dilation), scale, border)
    return neighborhood._ReferenceKernels.forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias, window_weight)


@register_decomposition(torch.ops.attnzoo.routing_attention_forward.default)
def routing_attention_forward(q, k, v, region_index, regions, scale, backend):
    """``(out, lse)`` of checked arguments by the reference (region ids are not checked in the graph)."""
    return routing._ReferenceKernels.forward(q, k, v, region_index, regions, scale)


# for torch.export users: ``exported.run_decompositions(DECOMPOSITIONS)`` leaves a program of aten ops only
DECOMPOSITIONS = {torch.ops.attnzoo.neighborhood_attention_2d_forward.default: neighborhood_attention_2d_forward,
                  torch.ops.attnzoo.routing_attention_forward.default: routing_attention_forward}
