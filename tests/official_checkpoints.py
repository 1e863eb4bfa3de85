"""State dicts laid out as the official repositories' checkpoints, for the conversion tests.

The key names and shapes are written from the official model code (CSWin:
``microsoft/CSWin-Transformer`` ``models/cswin.py``; NAT / DiNAT:
``SHI-Labs/Neighborhood-Attention-Transformer`` ``classification/nat.py``, ``dinat.py``; LITv2:
``ziplab/LITv2`` ``classification/models/*.py``; CrossFormer / CrossFormer++: ``cheerss/CrossFormer``
``models/crossformer.py`` of branch ``main`` and, for the v1 checkpoints, of branch ``crossformer``),
not from attnzoo's converters. ``OFFICIAL_KEY_COUNTS`` comes from instantiating that official code
(commits f111ae2, d334f5b, 7501c86 and 7952010; NATTEN's attention module replaced by one with its
parameters ``qkv``, ``rpb``, ``proj``, LITv2's CUDA DCN by a module with its parameters; timm 1.0.31):
its state dict has that many entries and exactly ``reference_params.OFFICIAL_PARAMS`` parameters
(BatchNorm statistics are buffers), which the tests check these builders against.

Tensors are random (seeded), or shape-only on the ``meta`` device for the large variants.
"""
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from attnzoo.backbones._checkpoint import rename_by_first_rule
from reference_params import OFFICIAL_PARAMS

# len(official_model.state_dict()) of each variant, 1000-class head
OFFICIAL_KEY_COUNTS = {
    'cswin_tiny_224': 418,
    'cswin_small_224': 656,
    'cswin_base_224': 656,
    'cswin_large_224': 656,
    'cswin_base_384': 656,
    'cswin_large_384': 656,
    'nat_mini': 253,
    'nat_tiny': 409,
    'nat_small': 469,
    'nat_base': 469,
    'dinat_mini': 253,
    'dinat_tiny': 409,
    'dinat_small': 409,
    'dinat_base': 469,
    'litv2_small': 219,
    'litv2_medium': 459,
    'litv2_base': 459,
    'litv2_base_384': 459,
    # CrossFormer (main branch; the old branch adds two DPB buffers per block: CROSSFORMER_V1_KEY_COUNTS)
    'crossformer_tiny': 448,
    'crossformer_small': 344,
    'crossformer_base': 656,
    'crossformer_large': 656,
    'crossformer_pp_small': 676,
    'crossformer_pp_base': 676,
    'crossformer_pp_large': 676,
    'crossformer_pp_huge': 892,
}
# len(state_dict()) of the old ``crossformer`` branch's models, which made the released v1 checkpoints
CROSSFORMER_V1_KEY_COUNTS = {
    'crossformer_tiny': 480,
    'crossformer_small': 368,
    'crossformer_base': 704,
    'crossformer_large': 704,
}

# the official constructors' arguments (CSWin: models/cswin.py; NAT: nat.py, dinat.py)
CSWIN_OFFICIAL_ARCH = {
    'cswin_tiny_224': dict(embed_dim=64, depths=(1, 2, 21, 1)),
    'cswin_small_224': dict(embed_dim=64, depths=(2, 4, 32, 2)),
    'cswin_base_224': dict(embed_dim=96, depths=(2, 4, 32, 2)),
    'cswin_large_224': dict(embed_dim=144, depths=(2, 4, 32, 2)),
    'cswin_base_384': dict(embed_dim=96, depths=(2, 4, 32, 2)),
    'cswin_large_384': dict(embed_dim=144, depths=(2, 4, 32, 2)),
}
_NAT_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., layer_scale=None)
_NAT_TINY = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., layer_scale=None)
_NAT_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2., layer_scale=1e-5)
_NAT_BASE = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2., layer_scale=1e-5)
NAT_OFFICIAL_ARCH = {
    'nat_mini': _NAT_MINI,
    'nat_tiny': _NAT_TINY,
    'nat_small': _NAT_SMALL,
    'nat_base': _NAT_BASE,
    'dinat_mini': _NAT_MINI,
    'dinat_tiny': _NAT_TINY,
    'dinat_small': dict(_NAT_SMALL, layer_scale=None),  # dinat.py's Small has no layer_scale argument
    'dinat_base': _NAT_BASE,
}

# classification/configs/litv2-*.yaml (alpha 0.9 and LOCAL_WS [0, 0, 2, 1] in every one)
_LITV2_S = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_LITV2_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
LITV2_OFFICIAL_ARCH = {
    'litv2_small': _LITV2_S,
    'litv2_medium': dict(_LITV2_S, depths=(2, 2, 18, 2)),
    'litv2_base': _LITV2_B,
    'litv2_base_384': _LITV2_B,
}
# BatchNorm statistics: in the state dict, not parameters
_BUFFER_SUFFIXES = ('.running_mean', '.running_var', '.num_batches_tracked')


def official_parameter_count(state_dict: Dict[str, torch.Tensor]) -> int:
    """What ``sum(p.numel() for p in official_model.parameters())`` gives for the model that saved ``state_dict``."""
    return sum(v.numel() for k, v in state_dict.items() if not k.endswith(_BUFFER_SUFFIXES))


# the official configs (configs/crossformer/*.yaml, configs/crossformer_pp/*.yaml)
_V1, _PP = dict(activation_cooling=False), dict(activation_cooling=True)
CROSSFORMER_OFFICIAL_ARCH = {
    'crossformer_tiny': dict(embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16), **_V1),
    'crossformer_small': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), **_V1),
    'crossformer_base': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_V1),
    'crossformer_large': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_V1),
    'crossformer_pp_small': dict(embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), **_PP),
    'crossformer_pp_base': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_PP),
    'crossformer_pp_large': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_PP),
    'crossformer_pp_huge': dict(embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), **_PP),
}


def _tensor_factory(device: Optional[str], seed: int):
    if device == 'meta':
        return lambda *shape: torch.empty(*shape, device='meta')
    generator = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=generator)


def cswin_official_state_dict(embed_dim: int, depths: Sequence[int], num_classes: int = 1000, in_chans: int = 3,
                              mlp_ratio: int = 4, device: Optional[str] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Named and shaped like the official classification ``CSWinTransformer`` (last stage: one branch)."""
    tensor = _tensor_factory(device, seed)
    sd = {}

    def add(name, *shape):
        sd[name] = tensor(*shape)

    dims = [embed_dim * 2 ** i for i in range(4)]
    add('stage1_conv_embed.0.weight', dims[0], in_chans, 7, 7)
    add('stage1_conv_embed.0.bias', dims[0])
    add('stage1_conv_embed.2.weight', dims[0])
    add('stage1_conv_embed.2.bias', dims[0])
    for s, (dim, depth) in enumerate(zip(dims, depths), start=1):
        if s > 1:
            add(f'merge{s - 1}.conv.weight', dim, dim // 2, 3, 3)
            add(f'merge{s - 1}.conv.bias', dim)
            add(f'merge{s - 1}.norm.weight', dim)
            add(f'merge{s - 1}.norm.bias', dim)
        num_branches = 1 if s == 4 else 2
        for b in range(depth):
            p = f'stage{s}.{b}.'
            add(p + 'qkv.weight', 3 * dim, dim)
            add(p + 'qkv.bias', 3 * dim)
            add(p + 'norm1.weight', dim)
            add(p + 'norm1.bias', dim)
            add(p + 'proj.weight', dim, dim)
            add(p + 'proj.bias', dim)
            for a in range(num_branches):
                add(p + f'attns.{a}.get_v.weight', dim // num_branches, 1, 3, 3)
                add(p + f'attns.{a}.get_v.bias', dim // num_branches)
            add(p + 'mlp.fc1.weight', mlp_ratio * dim, dim)
            add(p + 'mlp.fc1.bias', mlp_ratio * dim)
            add(p + 'mlp.fc2.weight', dim, mlp_ratio * dim)
            add(p + 'mlp.fc2.bias', dim)
            add(p + 'norm2.weight', dim)
            add(p + 'norm2.bias', dim)
    add('norm.weight', dims[3])
    add('norm.bias', dims[3])
    add('head.weight', num_classes, dims[3])
    add('head.bias', num_classes)
    return sd


def nat_official_state_dict(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], mlp_ratio: float,
                            layer_scale: Optional[float], kernel_size: int = 7, num_classes: int = 1000,
                            in_chans: int = 3, device: Optional[str] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Named and shaped like the official classification/nat.py ``NAT`` (DiNAT has the same keys)."""
    shapes = {
        'patch_embed.proj.0.weight': (embed_dim // 2, in_chans, 3, 3),
        'patch_embed.proj.0.bias': (embed_dim // 2,),
        'patch_embed.proj.1.weight': (embed_dim, embed_dim // 2, 3, 3),
        'patch_embed.proj.1.bias': (embed_dim,),
        'patch_embed.norm.weight': (embed_dim,),
        'patch_embed.norm.bias': (embed_dim,),
    }
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim, hidden = embed_dim * 2 ** i, int(embed_dim * 2 ** i * mlp_ratio)
        for j in range(depth):
            block = f'levels.{i}.blocks.{j}.'
            shapes.update({
                block + 'norm1.weight': (dim,), block + 'norm1.bias': (dim,),
                block + 'attn.qkv.weight': (3 * dim, dim), block + 'attn.qkv.bias': (3 * dim,),
                block + 'attn.rpb': (heads, 2 * kernel_size - 1, 2 * kernel_size - 1),
                block + 'attn.proj.weight': (dim, dim), block + 'attn.proj.bias': (dim,),
                block + 'norm2.weight': (dim,), block + 'norm2.bias': (dim,),
                block + 'mlp.fc1.weight': (hidden, dim), block + 'mlp.fc1.bias': (hidden,),
                block + 'mlp.fc2.weight': (dim, hidden), block + 'mlp.fc2.bias': (dim,),
            })
            if layer_scale is not None:
                shapes.update({block + 'gamma1': (dim,), block + 'gamma2': (dim,)})
        if i < len(depths) - 1:
            shapes.update({
                f'levels.{i}.downsample.reduction.weight': (2 * dim, dim, 3, 3),
                f'levels.{i}.downsample.norm.weight': (2 * dim,),
                f'levels.{i}.downsample.norm.bias': (2 * dim,),
            })
    final_dim = embed_dim * 2 ** (len(depths) - 1)
    shapes.update({'norm.weight': (final_dim,), 'norm.bias': (final_dim,),
                   'head.weight': (num_classes, final_dim), 'head.bias': (num_classes,)})
    tensor = _tensor_factory(device, seed)
    return {key: tensor(*shape) for key, shape in shapes.items()}


def litv2_official_state_dict(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], alpha: float = 0.9,
                              local_ws: Sequence[int] = (0, 0, 2, 1), mlp_ratio: int = 4, num_classes: int = 1000,
                              in_chans: int = 3, device: Optional[str] = None,
                              seed: int = 0) -> Dict[str, torch.Tensor]:
    """Named and shaped like the official classification ``LITv2`` (models/litv2.py, layers.py, blocks.py,
    attentions.py, patch_embed.py): ``has_msa`` where ``local_ws`` is non-zero, HiLo with
    ``int(heads * alpha)`` Lo-Fi heads (all of them at window 1), DTM closing every stage but the last."""
    shapes = {
        'patch_embed.proj.weight': (embed_dim, in_chans, 4, 4), 'patch_embed.proj.bias': (embed_dim,),
        'patch_embed.norm.weight': (embed_dim,), 'patch_embed.norm.bias': (embed_dim,),
    }
    for i, (depth, heads, ws) in enumerate(zip(depths, num_heads, local_ws)):
        dim, hidden = embed_dim * 2 ** i, embed_dim * 2 ** i * mlp_ratio
        lofi_heads = heads if ws == 1 else int(heads * alpha)
        l_dim, h_dim = lofi_heads * dim // heads, (heads - lofi_heads) * dim // heads
        for j in range(depth):
            block = f'layers.{i}.blocks.{j}.'
            if ws:
                shapes.update({block + 'norm1.weight': (dim,), block + 'norm1.bias': (dim,)})
            if ws and l_dim:
                shapes.update({
                    block + 'attn.l_q.weight': (l_dim, dim), block + 'attn.l_q.bias': (l_dim,),
                    block + 'attn.l_kv.weight': (2 * l_dim, dim), block + 'attn.l_kv.bias': (2 * l_dim,),
                    block + 'attn.l_proj.weight': (l_dim, l_dim), block + 'attn.l_proj.bias': (l_dim,),
                })
            if ws and h_dim:
                shapes.update({
                    block + 'attn.h_qkv.weight': (3 * h_dim, dim), block + 'attn.h_qkv.bias': (3 * h_dim,),
                    block + 'attn.h_proj.weight': (h_dim, h_dim), block + 'attn.h_proj.bias': (h_dim,),
                })
            shapes.update({
                block + 'norm2.weight': (dim,), block + 'norm2.bias': (dim,),
                block + 'mlp.fc1.weight': (hidden, dim), block + 'mlp.fc1.bias': (hidden,),
                block + 'mlp.dwconv.dwconv.weight': (hidden, 1, 3, 3), block + 'mlp.dwconv.dwconv.bias': (hidden,),
                block + 'mlp.fc2.weight': (dim, hidden), block + 'mlp.fc2.bias': (dim,),
            })
        if i < len(depths) - 1:
            merge = f'layers.{i}.downsample.'
            shapes.update({
                merge + 'dconv.weight': (2 * dim, dim, 2, 2), merge + 'dconv.bias': (2 * dim,),
                merge + 'dconv.conv_offset.weight': (8, dim, 2, 2), merge + 'dconv.conv_offset.bias': (8,),
                **{merge + f'norm_layer.{name}': (2 * dim,) for name in ('weight', 'bias', 'running_mean')},
            })
    final_dim = embed_dim * 2 ** (len(depths) - 1)
    shapes.update({'norm.weight': (final_dim,), 'norm.bias': (final_dim,),
                   'head.weight': (num_classes, final_dim), 'head.bias': (num_classes,)})
    tensor = _tensor_factory(device, seed)
    sd = {key: tensor(*shape) for key, shape in shapes.items()}
    for i in range(len(depths) - 1):  # statistics a trained BatchNorm could have
        merge = f'layers.{i}.downsample.norm_layer.'
        sd[merge + 'running_var'] = tensor(2 * embed_dim * 2 ** i).abs() + 0.5
        sd[merge + 'num_batches_tracked'] = torch.tensor(1000, device=device)
    return sd


def crossformer_official_state_dict(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int],
                                    activation_cooling: bool, v1_buffers: bool = False, group_size: int = 7,
                                    num_classes: int = 1000, in_chans: int = 3, device: Optional[str] = None,
                                    seed: int = 0) -> Dict[str, torch.Tensor]:
    """Named and shaped like the official classification ``CrossFormer`` (branch ``main``); ``v1_buffers``
    adds the DPB buffers the old branch saves (``attn.biases``, ``attn.relative_position_index``, here
    for a ``group_size`` group: they are dropped on conversion whatever their size)."""
    shapes = {}
    stem_dims = [embed_dim // 2, embed_dim // 4, embed_dim // 8, embed_dim // 8]  # C/2, C/4, C/8, C/8
    for i, (dim, kernel) in enumerate(zip(stem_dims, (4, 8, 16, 32))):
        shapes.update({f'patch_embed.projs.{i}.weight': (dim, in_chans, kernel, kernel),
                       f'patch_embed.projs.{i}.bias': (dim,)})
    shapes.update({'patch_embed.norm.weight': (embed_dim,), 'patch_embed.norm.bias': (embed_dim,)})
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2 ** i
        pos_dim = dim // 4 // 4  # DynamicPosBias(dim // 4) and its own pos_dim = dim // 4
        for j in range(depth):
            block = f'layers.{i}.blocks.{j}.'
            shapes.update({block + 'norm1.weight': (dim,), block + 'norm1.bias': (dim,),
                           block + 'attn.pos.pos_proj.weight': (pos_dim, 2),
                           block + 'attn.pos.pos_proj.bias': (pos_dim,)})
            for n, out_dim in ((1, pos_dim), (2, pos_dim), (3, heads)):
                pos = block + f'attn.pos.pos{n}.'
                shapes.update({pos + '0.weight': (pos_dim,), pos + '0.bias': (pos_dim,),
                               pos + '2.weight': (out_dim, pos_dim), pos + '2.bias': (out_dim,)})
            if v1_buffers:
                shapes.update({block + 'attn.biases': ((2 * group_size - 1) ** 2, 2),
                               block + 'attn.relative_position_index': (group_size ** 2, group_size ** 2)})
            shapes.update({
                block + 'attn.qkv.weight': (3 * dim, dim), block + 'attn.qkv.bias': (3 * dim,),
                block + 'attn.proj.weight': (dim, dim), block + 'attn.proj.bias': (dim,),
                block + 'norm2.weight': (dim,), block + 'norm2.bias': (dim,),
                block + 'mlp.fc1.weight': (4 * dim, dim), block + 'mlp.fc1.bias': (4 * dim,),
                block + 'mlp.fc2.weight': (dim, 4 * dim), block + 'mlp.fc2.bias': (dim,),
            })
            if activation_cooling and (j + 1) % 3 == 0 and j < depth - 1:
                shapes.update({block + 'ex_conv.weight': (dim, 1, 3, 3), block + 'ex_conv.bias': (dim,),
                               block + 'ex_ln.weight': (dim,), block + 'ex_ln.bias': (dim,)})
        if i < len(depths) - 1:  # the cross-scale merge closing the stage: kernels 2 and 4, C channels each
            shapes.update({
                f'layers.{i}.downsample.norm.weight': (dim,), f'layers.{i}.downsample.norm.bias': (dim,),
                f'layers.{i}.downsample.reductions.0.weight': (dim, dim, 2, 2),
                f'layers.{i}.downsample.reductions.0.bias': (dim,),
                f'layers.{i}.downsample.reductions.1.weight': (dim, dim, 4, 4),
                f'layers.{i}.downsample.reductions.1.bias': (dim,),
            })
    final_dim = embed_dim * 2 ** (len(depths) - 1)
    shapes.update({'norm.weight': (final_dim,), 'norm.bias': (final_dim,),
                   'head.weight': (num_classes, final_dim), 'head.bias': (num_classes,)})
    tensor = _tensor_factory(device, seed)
    return {key: tensor(*shape) for key, shape in shapes.items()}


# our key -> the official one, the first matching rule per key (the inverse of the families' converters,
# written from the official code; the tests check its key set against the builders above)
_TO_OFFICIAL_RULES = {
    'cswin': (
        (r'^stem\.conv\.', lambda m: 'stage1_conv_embed.0.'),
        (r'^stem\.norm\.', lambda m: 'stage1_conv_embed.2.'),
        (r'^stages\.(\d+)\.downsample\.', lambda m: f'merge{m[1]}.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.attn\.branches\.(\d+)\.lepe\.',
         lambda m: f'stage{int(m[1]) + 1}.{m[2]}.attns.{m[3]}.get_v.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.(attn\.)?', lambda m: f'stage{int(m[1]) + 1}.{m[2]}.'),
        (r'^head\.fc\.', lambda m: 'head.'),
    ),
    'nat': (
        (r'^stem\.conv([12])\.', lambda m: f'patch_embed.proj.{int(m[1]) - 1}.'),
        (r'^stem\.norm\.', lambda m: 'patch_embed.norm.'),
        (r'^stages\.(\d+)\.downsample\.conv\.', lambda m: f'levels.{int(m[1]) - 1}.downsample.reduction.'),
        (r'^stages\.(\d+)\.downsample\.norm\.', lambda m: f'levels.{int(m[1]) - 1}.downsample.norm.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.ls([12])\.gamma$', lambda m: f'levels.{m[1]}.blocks.{m[2]}.gamma{m[3]}'),
        (r'^stages\.(\d+)\.blocks\.', lambda m: f'levels.{m[1]}.blocks.'),
        (r'^head\.fc\.', lambda m: 'head.'),
    ),
    'crossformer': (
        (r'^stem\.', lambda m: 'patch_embed.'),
        (r'^stages\.(\d+)\.downsample\.', lambda m: f'layers.{int(m[1]) - 1}.downsample.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.attn\.pos\.proj\.',
         lambda m: f'layers.{m[1]}.blocks.{m[2]}.attn.pos.pos_proj.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.attn\.pos\.layers\.(\d)\.',
         lambda m: f'layers.{m[1]}.blocks.{m[2]}.attn.pos.pos{int(m[3]) + 1}.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.cooling\.conv\.', lambda m: f'layers.{m[1]}.blocks.{m[2]}.ex_conv.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.cooling\.norm\.', lambda m: f'layers.{m[1]}.blocks.{m[2]}.ex_ln.'),
        (r'^stages\.(\d+)\.blocks\.', lambda m: f'layers.{m[1]}.blocks.'),
        (r'^head\.fc\.', lambda m: 'head.'),
    ),
    # timm-native families whose release files are not in timm's layout: SHViT (model/shvit.py of ysj9909/SHViT:
    # stage s's modules in blocks{s+1}, the downsampling first: Sequential(dw conv, FFN), PatchMerging,
    # Sequential(dw conv, FFN)) and DaViT (the Microsoft layout timm's davit.checkpoint_filter_fn documents:
    # patch_embeds, main_blocks, cpe.0 / cpe.1, norms, head)
    'shvit': (
        (r'^stages\.0\.blocks\.', lambda m: 'blocks1.'),
        (r'^stages\.(\d)\.downsample\.([01])\.', lambda m: f'blocks{int(m[1]) + 1}.0.{m[2]}.'),
        (r'^stages\.(\d)\.downsample\.2\.', lambda m: f'blocks{int(m[1]) + 1}.1.'),
        (r'^stages\.(\d)\.downsample\.([34])\.', lambda m: f'blocks{int(m[1]) + 1}.2.{int(m[2]) - 3}.'),
        (r'^stages\.(\d)\.blocks\.(\d+)\.', lambda m: f'blocks{int(m[1]) + 1}.{int(m[2]) + 3}.'),
    ),
    'davit': (
        (r'^stem\.conv\.', lambda m: 'patch_embeds.0.proj.'),
        (r'^stem\.norm\.', lambda m: 'patch_embeds.0.norm.'),
        (r'^stages\.(\d)\.downsample\.conv\.', lambda m: f'patch_embeds.{m[1]}.proj.'),
        (r'^stages\.(\d)\.downsample\.norm\.', lambda m: f'patch_embeds.{m[1]}.norm.'),
        (r'^stages\.(\d)\.blocks\.(.*)\.cpe([12])\.', lambda m: f'main_blocks.{m[1]}.{m[2]}.cpe.{int(m[3]) - 1}.'),
        (r'^stages\.(\d)\.blocks\.', lambda m: f'main_blocks.{m[1]}.'),
        (r'^head\.fc\.', lambda m: 'head.'),
        (r'^head\.norm\.', lambda m: 'norms.'),
    ),
}


def to_official_layout(family: str, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our state dict of a CSWin (``family='cswin'``), NAT / DiNAT (``'nat'``) or CrossFormer (``'crossformer'``,
    the main branch's names) model, or timm's of an SHViT (``'shvit'``) or DaViT (``'davit'``), under the
    official names."""
    return {rename_by_first_rule(k, _TO_OFFICIAL_RULES[family]): v for k, v in state_dict.items()}


# how the official files hold their state dict: as it is, under one of the keys the official training
# scripts save, or under 'state_dict' with DistributedDataParallel's 'module.' prefix
CHECKPOINT_WRAPS = ('plain', 'model', 'state_dict', 'state_dict_ema', 'state_dict_module')


def wrap_as_saved(state_dict: Dict[str, torch.Tensor], wrap: str) -> Dict:
    """``state_dict`` as a checkpoint file wrapped as ``wrap`` (one of ``CHECKPOINT_WRAPS``) holds it."""
    if wrap == 'plain':
        return state_dict
    if wrap == 'state_dict_module':
        return {'state_dict': {'module.' + k: v for k, v in state_dict.items()}}
    return {wrap: state_dict, 'epoch': 300}


def assert_official_checkpoint_loads(official: Dict[str, torch.Tensor], model: nn.Module,
                                     checkpoint_filter_fn: Callable, wrap: str, key_samples: Dict[str, str]):
    """``official`` wrapped as ``wrap`` converts to as many keys, loads strictly into ``model``, and each
    official key of ``key_samples`` lands, unchanged, on our key it names."""
    converted = checkpoint_filter_fn(wrap_as_saved(official, wrap), model)
    assert len(converted) == len(official)
    model.load_state_dict(converted, strict=True)
    ours = model.state_dict()
    for official_key, our_key in key_samples.items():
        assert torch.equal(ours[our_key], official[official_key]), official_key


def assert_official_layout_converts(name: str, model: nn.Module, checkpoint_filter_fn: Callable):
    """The official key set of variant ``name`` (as many keys and parameters as the official model has)
    converts onto exactly the keys and shapes of ``model``."""
    if name in CSWIN_OFFICIAL_ARCH:
        official = cswin_official_state_dict(**CSWIN_OFFICIAL_ARCH[name], device='meta')
    elif name in LITV2_OFFICIAL_ARCH:
        official = litv2_official_state_dict(**LITV2_OFFICIAL_ARCH[name], device='meta')
    elif name in CROSSFORMER_OFFICIAL_ARCH:
        official = crossformer_official_state_dict(**CROSSFORMER_OFFICIAL_ARCH[name], device='meta')
    else:
        official = nat_official_state_dict(**NAT_OFFICIAL_ARCH[name], device='meta')
    assert len(official) == OFFICIAL_KEY_COUNTS[name]
    assert official_parameter_count(official) == OFFICIAL_PARAMS[name]
    converted = checkpoint_filter_fn(official, model)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}

