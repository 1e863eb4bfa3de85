"""An empty batch (B=0) through the timm-native families whose timm modules reject one.

timm's MaxViT and HaloNet variants attnzoo ships (``_families.TIMM_NATIVE_FAMILIES``) fail on a batch of
0 images in three modules, each at a ``view`` / ``reshape`` that names the batch size and infers another
dimension with ``-1``, which is ambiguous in a tensor of 0 elements: ``timm.models.maxxvit.AttentionCl``
(MaxViT), ``timm.layers.halo_attn.HaloAttn`` (HaloNet) and ``timm.layers.eca.EcaModule`` (ECA-HaloNeXt).
attnzoo does not rewrite timm's models (DESIGN.md): importing ``attnzoo.backbones`` installs an empty-batch
guard on exactly these three classes.

The guard keeps timm's ``forward`` as ``_timm_forward`` and calls it unchanged for B > 0 (one shape check
more, no other work). For B = 0 it runs timm's ``forward`` on the batch with one stand-in sample of zeros
appended and returns the output without it: an empty output shaped as timm's, zero gradients for the
parameters timm's forward uses, an empty gradient for the input. None of the three modules holds running
statistics (no BatchNorm), so nothing the stand-in computes is kept. TorchScript compiles the guard with
timm's forward; FX sees timm's forward alone (a traced batch size is not known); torch.compile and
torch.export resolve the check from the input's shape.
"""
import types
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers.eca import EcaModule
from timm.layers.halo_attn import HaloAttn
from timm.models.maxxvit import AttentionCl


def _is_empty_batch(x: torch.Tensor) -> bool:
    if torch.jit.is_scripting():
        return x.shape[0] == 0
    return not isinstance(x, torch.fx.Proxy) and x.shape[0] == 0  # FX traces a Proxy of unknown size


def _with_stand_in(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one sample of zeros appended to its batch (the gradient flows back to ``x``)."""
    return F.pad(x, [0, 0] * (x.dim() - 1) + [0, 1])


def _guarded_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _is_empty_batch(x):
        return self._timm_forward(_with_stand_in(x))[:0]
    return self._timm_forward(x)


def _guarded_attention_forward(self, x: torch.Tensor, shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    if _is_empty_batch(x):
        return self._timm_forward(_with_stand_in(x), shared_rel_pos)[:0]
    return self._timm_forward(x, shared_rel_pos)


# the timm families (modules) whose variants attnzoo ships go through the guarded classes
GUARDED_FAMILIES = ('maxxvit', 'byoanet')
GUARDED_FORWARDS = {
    AttentionCl: _guarded_attention_forward,
    HaloAttn: _guarded_forward,
    EcaModule: _guarded_forward,
}


def _renamed(function, name):
    """``function`` under ``name``: TorchScript compiles a method that ``forward`` calls on ``self`` under its
    function's ``__name__``, and timm's is ``forward``, the guard's method ("Can't redefine method")."""
    renamed = types.FunctionType(function.__code__, function.__globals__, name, function.__defaults__,
                                 function.__closure__)
    renamed.__annotations__ = function.__annotations__
    renamed.__qualname__ = function.__qualname__.rsplit('.', 1)[0] + '.' + name
    return renamed


def install_empty_batch_guards():
    """Puts the guard in front of each class's timm ``forward`` (once: importing again changes nothing)."""
    for cls, guarded_forward in GUARDED_FORWARDS.items():
        if '_timm_forward' not in vars(cls):
            cls._timm_forward = _renamed(cls.forward, '_timm_forward')
            cls.forward = guarded_forward

