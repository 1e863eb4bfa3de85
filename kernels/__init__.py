"""attnzoo.kernels: attention ops with a fused Triton path and a PyTorch reference of the same signature."""
from .neighborhood import neighborhood_attention_2d
