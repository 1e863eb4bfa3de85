"""attnzoo.kernels: attention ops with a fused Triton path and a PyTorch reference of the same signature."""
from .neighborhood import neighborhood_attention_2d
from .routing import routing_attention, routing_region_index

__all__ = ['neighborhood_attention_2d', 'routing_attention', 'routing_region_index']
