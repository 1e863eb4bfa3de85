"""DAT++ specifics: the official block layout, the deformable attention against a hand-written
reference (bilinear sampling and bias lookup by hand, no grid_sample), 'N' blocks on attnzoo's
neighborhood op (fused and reference paths agree), any input size, and official checkpoints in the
classification and DAT-Detection / DAT-Segmentation layouts.

The generic timm API and the parameter counts are covered by the conformance suite; the OpenMMLab
configs are built by tests/test_heads.py and trained / run here (skipped without OpenMMLab).
"""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo.backbones  # noqa: F401  (registers the models)
from attnzoo.backbones import _layers, dat, nat
from attnzoo.backbones.dat import DAT, DeformableAttention, checkpoint_filter_fn
from attnzoo.kernels import get_na_kernel, neighborhood_attention_2d, use_backend, use_na_kernel
from attnzoo.kernels._dispatch import NA_KERNELS, triton_interpreted
from mm_stack import needs_mm
from official_checkpoints import CHECKPOINT_WRAPS, wrap_as_saved

# a small DAT++ (head_dim 16, the smallest the neighborhood op takes), every block type in every stage
SMALL_ARGS = dict(dims=(32, 64, 128, 256), stage_spec=('ND', 'DN', 'ND', 'D'), num_heads=(2, 4, 8, 16),
                  groups=(1, 2, 4, 8), num_classes=10)

OFFICIAL_SPEC = [['N', 'D'], ['N', 'D'] * 2, ['N', 'D'] * 9, ['D', 'D']]
# configs/dat_*.yaml of LeapLabTHU/DAT: dims, heads, groups, MODEL.DAT.img_size (what the bias tables are
# sized for), DATA.IMG_SIZE (the input); dat_base_384.yaml keeps MODEL.DAT.img_size 224
OFFICIAL_VARIANTS = {
    'dat_pp_tiny': ((64, 128, 256, 512), (2, 4, 8, 16), (1, 2, 4, 8), 224, 224),
    'dat_pp_small': ((96, 192, 384, 768), (3, 6, 12, 24), (1, 2, 3, 6), 224, 224),
    'dat_pp_base': ((128, 256, 512, 1024), (4, 8, 16, 32), (2, 4, 8, 16), 224, 224),
    'dat_pp_base_384': ((128, 256, 512, 1024), (4, 8, 16, 32), (2, 4, 8, 16), 224, 384),
}


def small_dat(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DAT(**dict(SMALL_ARGS, **kwargs)).eval()


# ---------------------------------------------------------------- the official layout

@pytest.mark.parametrize('name', sorted(OFFICIAL_VARIANTS))
def test_blocks_follow_the_official_stage_spec(name):
    dims, heads, groups, img_size, input_size = OFFICIAL_VARIANTS[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    for i, stage in enumerate(model.stages):
        types = ['N' if isinstance(block.attn, nat.NeighborhoodAttention) else 'D' for block in stage.blocks]
        assert types == OFFICIAL_SPEC[i]
        map_size = img_size // 4 // 2 ** i
        for block in stage.blocks:
            attn = block.attn
            if isinstance(attn, nat.NeighborhoodAttention):
                assert (attn.kernel_size, attn.dilation, attn.num_heads) == (7, 1, heads[i])
                assert attn.rpb.shape == (heads[i], 13, 13)
                continue
            conv = attn.offset.conv
            assert conv.kernel_size == ((9, 7, 5, 3)[i],) * 2 and conv.stride == ((8, 4, 2, 1)[i],) * 2
            assert conv.groups == conv.in_channels == dims[i] // groups[i]
            assert (attn.num_heads, attn.groups) == (heads[i], groups[i])
            # the bias table spans every displacement of the stage map at MODEL.DAT.img_size, so the
            # official tables load unchanged
            assert attn.rpe_table.shape == (heads[i], 2 * map_size - 1, 2 * map_size - 1)
    assert model.pretrained_cfg['input_size'] == (3, input_size, input_size)


@pytest.mark.parametrize('kwargs, match', [
    (dict(stage_spec=('ND', 'NX', 'ND', 'D')), r"'NX'.*\['X'\]"),
    (dict(stage_spec=('ND', '', 'ND', 'D')), 'non-empty'),
    (dict(groups=(1, 2, 4)), '3 groups entries for 4 stages'),
    (dict(num_heads=(2, 4, 8, 16), groups=(1, 3, 4, 8)), 'groups'),
])
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DAT(**dict(SMALL_ARGS, **kwargs))


# ---------------------------------------------------------------- deformable attention by hand

def bilinear(image, x, y):
    """``image [C, H, W]`` read at points ``x, y`` (any shape) on the align_corners=True scale, where
    -1 / 1 are the centres of the first / last pixel; zero outside the map."""
    _, height, width = image.shape
    px, py = (x + 1) / 2 * (width - 1), (y + 1) / 2 * (height - 1)
    x0, y0 = px.floor(), py.floor()
    out = 0
    for cx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for cy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
            value = image[:, cy.clamp(0, height - 1).long(), cx.clamp(0, width - 1).long()]
            out = out + value * (wx * wy * inside)
    return out


def axis_coordinates(length, first):
    """The official normalisation, ``(first + i) / (length - 1) * 2 - 1``; a one-position axis at 0."""
    if length == 1:
        return torch.zeros(1, dtype=torch.float64)
    return (torch.arange(length, dtype=torch.float64) + first) / (length - 1) * 2 - 1


def sampling_points(attn, q):
    """Per group, the clamped sampling points ``(x, y)`` (flattened) of one image's queries ``q [H, W, C]``;
    and how many points the clamp moved."""
    group_dim = q.shape[-1] // attn.groups
    conv, norm, proj = attn.offset.conv, attn.offset.norm, attn.offset.proj
    points, clamped = [], 0
    for g in range(attn.groups):
        q_group = q[:, :, g * group_dim:(g + 1) * group_dim].permute(2, 0, 1)[None]       # [1, Cg, H, W]
        offset = F.conv2d(q_group, conv.weight, conv.bias, conv.stride, conv.padding, groups=group_dim)[0]
        offset = proj(F.gelu(norm(offset.permute(1, 2, 0))))                               # [Hk, Wk, (dy, dx)]
        ref_y, ref_x = torch.meshgrid(axis_coordinates(offset.shape[0], 0.5),
                                      axis_coordinates(offset.shape[1], 0.5), indexing='ij')
        raw_x, raw_y = ref_x + offset[..., 1], ref_y + offset[..., 0]
        clamped += int(((raw_x.abs() > 1) | (raw_y.abs() > 1)).sum())
        points.append((raw_x.clamp(-1, 1).flatten(), raw_y.clamp(-1, 1).flatten()))
    return points, clamped


def dense_deformable_attention(attn, x):
    """The official DAttentionBaseline (offset_range_factor=-1, rpe table) by hand, one image and head at
    a time; returns the output and how many sampling points were clamped into the map."""
    B, H, W, C = x.shape
    group_dim, group_heads, head_dim = C // attn.groups, attn.num_heads // attn.groups, C // attn.num_heads
    query_y, query_x = torch.meshgrid(axis_coordinates(H, 0.), axis_coordinates(W, 0.), indexing='ij')
    outputs, clamped = [], 0
    for b in range(B):
        q = attn.proj_q(x[b])
        points, moved = sampling_points(attn, q)
        clamped += moved
        # group g's channels are sampled at group g's points; proj_k / proj_v then mix all channels
        sampled = torch.cat([bilinear(x[b, :, :, g * group_dim:(g + 1) * group_dim].permute(2, 0, 1), *points[g]).T
                             for g in range(attn.groups)], dim=1)                           # [Ns, C]
        k, v = attn.proj_k(sampled), attn.proj_v(sampled)
        heads = []
        for head in range(attn.num_heads):
            point_x, point_y = points[head // group_heads]
            channels = slice(head * head_dim, (head + 1) * head_dim)
            logits = q[..., channels].reshape(H * W, head_dim) @ k[:, channels].T * head_dim ** -0.5
            # the bias table is read at half the query-to-point displacement
            displacement_x = (query_x.reshape(-1, 1) - point_x) * 0.5
            displacement_y = (query_y.reshape(-1, 1) - point_y) * 0.5
            logits = logits + bilinear(attn.rpe_table[head][None], displacement_x, displacement_y)[0]
            heads.append(logits.softmax(-1) @ v[:, channels])
        outputs.append(attn.proj_out(torch.cat(heads, dim=-1).reshape(H, W, C)))
    return torch.stack(outputs), clamped


@pytest.mark.parametrize('height, width, stride, kernel, groups', [
    (9, 11, 2, 3, 2),    # odd map: a 5 x 6 grid of points
    (12, 8, 4, 5, 1),    # one group
    (5, 7, 8, 9, 4),     # map smaller than the stride: a single point per group (1 x 1 grid)
    (1, 6, 1, 3, 2),     # a one-pixel-high map: one query row, one point row
])
def test_deformable_attention_matches_hand_written_reference(height, width, stride, kernel, groups):
    torch.manual_seed(0)
    dim, heads = 32, 4
    attn = DeformableAttention(dim, heads, groups, stride, kernel, table_size=(6, 5)).double().eval()
    with torch.no_grad():
        attn.offset.proj.weight.mul_(30)  # offsets of several pixels: points leave the map and get clamped
        attn.rpe_table.normal_()          # a bias large enough that a wrong lookup cannot hide
        for layer in (attn.proj_q, attn.proj_k, attn.proj_v):
            layer.bias.normal_()
    x = torch.randn(2, height, width, dim, dtype=torch.float64)
    with torch.no_grad():
        expected, clamped = dense_deformable_attention(attn, x)
        got = attn(x)
    assert clamped > 0, 'the offsets are too small to test the clamp'
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- neighborhood blocks

def test_neighborhood_blocks_run_on_the_attnzoo_op(monkeypatch):
    """'N' blocks are NAT's layer (shared from _layers) and call attnzoo.kernels.neighborhood_attention_2d with
    kernel 7, the NATTEN clamped border and their rpb; nothing in dat.py re-implements neighborhood attention."""
    assert dat.NeighborhoodAttention is nat.NeighborhoodAttention is _layers.NeighborhoodAttention
    calls = []

    def spy(q, k, v, kernel_size, **kwargs):
        calls.append((q.shape, kernel_size, kwargs))
        return neighborhood_attention_2d(q, k, v, kernel_size, **kwargs)

    monkeypatch.setattr(_layers, 'neighborhood_attention_2d', spy)
    model = small_dat()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    rpbs = [block.attn.rpb for stage in model.stages for block in stage.blocks
            if isinstance(block.attn, nat.NeighborhoodAttention)]
    assert len(calls) == len(rpbs) == 3
    for (shape, kernel_size, kwargs), rpb in zip(calls, rpbs):
        assert kernel_size == 7 and kwargs['rpb'] is rpb and kwargs.get('border', 'clamp') == 'clamp'
    # stage maps 16x24, 8x12, then 4x6: smaller than the window, padded to 7x7 as NATTEN's old module did
    assert [tuple(shape[1:3]) for shape, _, _ in calls] == [(16, 24), (8, 12), (7, 7)]


def assert_backends_agree(backend, device, na_kernel=None):
    """The whole model, forward and backward, with the 'N' blocks on ``backend`` (and ``na_kernel``'s Triton
    kernels) and on the PyTorch reference, through the kernels' process-wide switches: logits and every
    gradient, fp32, 1e-4."""
    x = torch.randn(2, 3, 48, 64, device=device)  # stage maps 12x16, then 6x8 and 3x4, which pad to the 7x7 window
    results = []
    for name in ('reference', backend):
        model = small_dat().to(device)
        with use_backend(name), use_na_kernel(na_kernel or get_na_kernel()):
            logits = model(x)
            logits.square().sum().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize('device', [
    'cpu',
    pytest.param('cuda', marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')]),
])
# v2 in the interpreter takes several times v1's time (about a minute here)
@pytest.mark.parametrize('na_kernel', [version if version == 'v1' else pytest.param(version, marks=pytest.mark.slow)
                                       for version in NA_KERNELS])
def test_fused_and_reference_neighborhood_paths_agree(device, na_kernel):
    """The fused Triton kernels, each version (on CPU in Triton's interpreter), against the reference."""
    pytest.importorskip('triton')
    if device == 'cpu' and not triton_interpreted():
        pytest.skip('Triton runs CPU tensors only under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)')
    assert_backends_agree('triton', device, na_kernel)


def test_default_cpu_kernels_and_reference_paths_agree():
    """The op's default path on CPU tensors (its tiled CPU kernels) against the reference."""
    assert_backends_agree(None, 'cpu')


# ---------------------------------------------------------------- any input size

@pytest.mark.parametrize('size', [(32, 32), (33, 65), (97, 75)])
def test_any_size_gives_finite_features(size):
    """Down to 32 px, where stage 4 is one pixel and the official code divides by zero (NaN)."""
    model = small_dat()
    with torch.no_grad():
        features = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
    expected = [tuple(-(-s // r) for s in size) for r in (4, 8, 16, 32)]
    assert [tuple(f.shape[2:]) for f in features] == expected
    assert all(torch.isfinite(f).all() for f in features)


@pytest.mark.parametrize('coarse', [True, False])
def test_group_matcher_orders_every_parameter_as_it_runs(coarse):
    """timm's layer-wise decay groups: every parameter in one group, group ids never decrease along the
    model (stem first, stage by stage, the head last)."""
    from timm.models import group_parameters
    model = small_dat()
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    group_of = {name: i for i, names in enumerate(groups.values()) for name in names}
    order = [group_of[name] for name, _ in model.named_parameters()]
    assert order == sorted(order) and order[0] == 0 and order[-1] == len(groups) - 1
    # stem, one group per stage or per block (a downsample joins its stage's first block, the final norm
    # the last block: timm's 99999 rule), the head with whatever matched nothing
    assert len(groups) == (1 + 4 + 1 if coarse else 1 + 7 + 1)


def test_attention_dropout_of_the_deformable_blocks():
    """The official attn_drop_rate drops out the deformable attention weights: at p = 1 nothing is
    attended and a block's attention gives the output projection's bias; in eval it is off."""
    model = small_dat(stage_spec=('D', 'DD', 'D', 'D'), attn_drop_rate=1.0)
    attn = model.stages[1].blocks[1].attn
    assert [block.attn.attn_drop.p for stage in model.stages for block in stage.blocks] == [1.0] * 5
    x = torch.randn(2, 8, 8, 64)
    torch.testing.assert_close(attn.train()(x), attn.proj_out.bias.expand(2, 8, 8, 64))
    assert not torch.allclose(attn.eval()(x), attn.proj_out.bias.expand(2, 8, 8, 64))


def test_attention_dropout_of_the_neighborhood_blocks():
    """The official attn_drop_rate also drops out the N blocks' attention probabilities (NATTEN's module
    applies it after the softmax): the explicit path computes the op's attention, and with dropout each
    query's probabilities, not its output channels, are dropped; in eval the op runs unchanged."""
    model = small_dat(attn_drop_rate=0.5)
    attn = model.stages[0].blocks[0].attn
    assert isinstance(attn, nat.NeighborhoodAttention) and attn.attn_drop.p == 0.5
    # 10x9 map, heads-last q, k, v as the layer makes them; the explicit path in eval (no dropout)
    q, k, v = torch.randn(3, 2, 10, 9, attn.num_heads, attn.head_dim).unbind(0)
    expected = neighborhood_attention_2d(q, k, v, attn.kernel_size, rpb=attn.rpb, backend='reference')
    torch.testing.assert_close(attn.attend_with_dropout(q, k, v), expected)
    # training: with v = 1, every channel of a head gives 2 x (the kept probabilities' sum), the same for all
    ones = torch.ones_like(v)
    attn.train()
    torch.manual_seed(0)
    dropped = attn.attend_with_dropout(q, k, ones)
    assert torch.equal(dropped, dropped[..., :1].expand_as(dropped))
    assert (dropped < 1.99).any() and (dropped > 0.01).any() and not torch.allclose(dropped, torch.ones_like(dropped))
    # the block runs the explicit path in training only; in eval the op (and the model's outputs) as before
    x = torch.randn(1, 10, 9, attn.qkv.in_features)
    torch.manual_seed(1)
    assert not torch.allclose(attn(x), attn(x))
    attn.eval()
    torch.testing.assert_close(attn(x), small_dat().stages[0].blocks[0].attn(x))


# ---------------------------------------------------------------- official checkpoints

def official_state_dict(dims, stage_spec, num_heads, groups, img_size=224, num_classes=1000, in_chans=3,
                        offset_kernel_sizes=(9, 7, 5, 3), seed=0):
    """Random tensors under the key names and shapes of the official models/dat.py (classification)."""
    stem = dims[0]
    shapes = {
        'patch_proj.0.weight': (stem // 2, in_chans, 3, 3), 'patch_proj.0.bias': (stem // 2,),
        'patch_proj.1.norm.weight': (stem // 2,), 'patch_proj.1.norm.bias': (stem // 2,),
        'patch_proj.3.weight': (stem, stem // 2, 3, 3), 'patch_proj.3.bias': (stem,),
        'patch_proj.4.norm.weight': (stem,), 'patch_proj.4.norm.bias': (stem,),
    }
    for i, (dim, spec, heads, group) in enumerate(zip(dims, stage_spec, num_heads, groups)):
        stage, hidden, group_dim = f'stages.{i}.', 4 * dim, dim // group
        table = 2 * (img_size // 4 // 2 ** i) - 1
        for d, kind in enumerate(spec):
            shapes.update({
                f'{stage}local_perception_units.{d}.weight': (dim, 1, 3, 3),
                f'{stage}local_perception_units.{d}.bias': (dim,),
                f'{stage}mlps.{d}.linear1.0.weight': (hidden, dim, 1, 1), f'{stage}mlps.{d}.linear1.0.bias': (hidden,),
                f'{stage}mlps.{d}.dwc.weight': (hidden, 1, 3, 3), f'{stage}mlps.{d}.dwc.bias': (hidden,),
                f'{stage}mlps.{d}.linear2.0.weight': (dim, hidden, 1, 1), f'{stage}mlps.{d}.linear2.0.bias': (dim,),
            })
            for n in (2 * d, 2 * d + 1):
                shapes.update({f'{stage}layer_norms.{n}.norm.weight': (dim,), f'{stage}layer_norms.{n}.norm.bias': (dim,)})
            attn = f'{stage}attns.{d}.'
            if kind == 'N':
                shapes.update({attn + 'qkv.weight': (3 * dim, dim), attn + 'qkv.bias': (3 * dim,),
                               attn + 'rpb': (heads, 13, 13),
                               attn + 'proj.weight': (dim, dim), attn + 'proj.bias': (dim,)})
            else:
                k = offset_kernel_sizes[i]
                shapes.update({attn + 'rpe_table': (heads, table, table),
                               attn + 'conv_offset.0.weight': (group_dim, 1, k, k),
                               attn + 'conv_offset.0.bias': (group_dim,),
                               attn + 'conv_offset.1.norm.weight': (group_dim,),
                               attn + 'conv_offset.1.norm.bias': (group_dim,),
                               attn + 'conv_offset.3.weight': (2, group_dim, 1, 1)})
                for proj in ('q', 'k', 'v', 'out'):
                    shapes.update({attn + f'proj_{proj}.weight': (dim, dim, 1, 1), attn + f'proj_{proj}.bias': (dim,)})
        if i < len(dims) - 1:
            shapes.update({f'down_projs.{i}.0.weight': (dims[i + 1], dim, 3, 3),
                           f'down_projs.{i}.1.norm.weight': (dims[i + 1],),
                           f'down_projs.{i}.1.norm.bias': (dims[i + 1],)})
    shapes.update({'cls_norm.norm.weight': (dims[-1],), 'cls_norm.norm.bias': (dims[-1],),
                   'cls_head.weight': (num_classes, dims[-1]), 'cls_head.bias': (num_classes,)})
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def official_small():
    return official_state_dict(SMALL_ARGS['dims'], SMALL_ARGS['stage_spec'], SMALL_ARGS['num_heads'],
                               SMALL_ARGS['groups'], num_classes=10)


def dense_state_dict(official, task):
    """The official classification weights as DAT-Detection / DAT-Segmentation save them: the backbone
    (no classifier, a LayerNorm per level) inside a detector / segmentor checkpoint of mmdet / mmseg."""
    backbone = {k: v for k, v in official.items() if not k.startswith(('cls_norm.', 'cls_head.'))}
    for i in range(4):
        dim = official[f'stages.{i}.layer_norms.0.norm.weight'].shape[0]
        backbone[f'norms.{i}.norm.weight'] = torch.full((dim,), 1. + i)
        backbone[f'norms.{i}.norm.bias'] = torch.full((dim,), float(i))
    if task == 'backbone':
        return backbone
    heads = {'detector': ('neck.fpn_convs.0.conv.weight', 'rpn_head.rpn_conv.weight', 'roi_head.bbox_head.fc_cls.weight'),
             'segmentor': ('decode_head.conv_seg.weight', 'auxiliary_head.conv_seg.weight')}[task]
    weights = {f'backbone.{k}': v for k, v in backbone.items()}
    weights.update({key: torch.zeros(3) for key in heads})
    return {'meta': {'epoch': 12}, 'state_dict': weights}


@pytest.mark.parametrize('wrap', CHECKPOINT_WRAPS)
def test_official_checkpoint_converts_and_loads_strictly(wrap):
    official = official_small()
    model = small_dat()
    model.load_state_dict(checkpoint_filter_fn(wrap_as_saved(official, wrap), model), strict=True)

    stage1 = model.stages[1]
    assert torch.equal(model.stem.norm1.weight, official['patch_proj.1.norm.weight'])
    assert torch.equal(model.stem.conv2.weight, official['patch_proj.3.weight'])
    # the official downsample after stage i opens our stage i + 1
    assert torch.equal(stage1.downsample.conv.weight, official['down_projs.0.0.weight'])
    assert torch.equal(model.stages[3].downsample.norm.bias, official['down_projs.2.1.norm.bias'])
    # layer_norms 2d / 2d + 1 are block d's norm1 / norm2
    assert torch.equal(stage1.blocks[1].norm1.weight, official['stages.1.layer_norms.2.norm.weight'])
    assert torch.equal(stage1.blocks[1].norm2.bias, official['stages.1.layer_norms.3.norm.bias'])
    assert torch.equal(stage1.blocks[0].lpu.weight, official['stages.1.local_perception_units.0.weight'])
    # 1x1 convs -> linear layers
    assert torch.equal(stage1.blocks[0].attn.proj_v.weight, official['stages.1.attns.0.proj_v.weight'][:, :, 0, 0])
    assert torch.equal(stage1.blocks[0].attn.offset.proj.weight,
                       official['stages.1.attns.0.conv_offset.3.weight'][:, :, 0, 0])
    assert torch.equal(stage1.blocks[0].mlp.fc2.weight, official['stages.1.mlps.0.linear2.0.weight'][:, :, 0, 0])
    assert torch.equal(stage1.blocks[0].attn.rpe_table, official['stages.1.attns.0.rpe_table'])
    assert torch.equal(stage1.blocks[1].attn.rpb, official['stages.1.attns.1.rpb'])
    assert torch.equal(model.norm.weight, official['cls_norm.norm.weight'])
    assert torch.equal(model.head.fc.weight, official['cls_head.weight'])


def test_official_dat_pp_tiny_layout_converts():
    """The real DAT-T++ key set: 589 tensors, 23,962,876 numbers, onto dat_pp_tiny."""
    official = official_state_dict(*OFFICIAL_VARIANTS['dat_pp_tiny'][:1], OFFICIAL_SPEC,
                                   *OFFICIAL_VARIANTS['dat_pp_tiny'][1:3])
    assert len(official) == 589
    assert sum(v.numel() for v in official.values()) == 23_962_876
    model = timm.create_model('dat_pp_tiny')
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)


@pytest.mark.parametrize('task', ['detector', 'segmentor', 'backbone'])
def test_dense_task_checkpoint_converts(task):
    """DAT-Detection / DAT-Segmentation checkpoints: the backbone's weights are taken (the task heads
    are not the backbone's), the last level's LayerNorm becomes the final norm, the others are
    reported as left out."""
    official = official_small()
    model = small_dat()
    with pytest.warns(UserWarning, match=r"norms\.0\.norm\.bias.*norms\.2\.norm\.weight.*out_norm=True"):
        converted = checkpoint_filter_fn(dense_state_dict(official, task), model)
    model.load_state_dict(converted, strict=False)
    missing = set(model.state_dict()) - set(converted)
    assert missing == {'head.fc.weight', 'head.fc.bias'}  # detectors have no classifier
    assert torch.equal(model.norm.weight, torch.full_like(model.norm.weight, 4.))
    assert torch.equal(model.norm.bias, torch.full_like(model.norm.bias, 3.))
    assert torch.equal(model.stages[2].blocks[1].attn.proj_k.weight, official['stages.2.attns.1.proj_k.weight'][:, :, 0, 0])
    with torch.no_grad():
        reference = small_dat()
        reference.load_state_dict(checkpoint_filter_fn(official, reference))
        x = torch.randn(1, 3, 64, 64)
        for got, expected in zip(model.forward_intermediates(x, intermediates_only=True)[:3],
                                 reference.forward_intermediates(x, intermediates_only=True)[:3]):
            torch.testing.assert_close(got, expected)


def test_rpe_tables_resize_as_the_official_loaders():
    """A 224 checkpoint into a model sized for 384 (DAT-B++ 384 fine-tuning, dense backbones): each
    bias table is resized bicubically (align_corners=False), as the official load_pretrained does."""
    official = official_small()
    model = small_dat(img_size=384)
    converted = checkpoint_filter_fn(official, model)
    model.load_state_dict(converted, strict=True)
    table = official['stages.0.attns.1.rpe_table']
    resized = model.stages[0].blocks[1].attn.rpe_table
    assert table.shape == (2, 111, 111) and resized.shape == (2, 191, 191)
    torch.testing.assert_close(resized, F.interpolate(table[None], size=(191, 191), mode='bicubic')[0])
    constant = dict(official, **{'stages.3.attns.0.rpe_table': torch.full((16, 13, 13), 0.25)})
    torch.testing.assert_close(checkpoint_filter_fn(constant, model)['stages.3.blocks.0.attn.rpe_table'],
                               torch.full((16, 23, 23), 0.25))


def test_own_state_dict_passes_through_and_mismatch_raises():
    model = small_dat()
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model).keys() == own.keys()

    official = official_small()
    del official['stages.1.attns.0.rpe_table']
    official['stages.1.attns.0.relative_position_bias_table'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r'stages\.1\.blocks\.0\.attn\.rpe_table.*relative_position_bias_table'):
        checkpoint_filter_fn(official, model)


def test_pretrained_without_a_file_says_where_the_weights_are():
    with pytest.raises(RuntimeError, match=r'cloud\.tsinghua\.edu\.cn.*pretrained_cfg_overlay=dict\(file='):
        timm.create_model('dat_pp_tiny', pretrained=True)


def test_pretrained_from_a_local_official_file(tmp_path):
    official = official_small()
    path = tmp_path / 'dat_small.pth'
    torch.save({'model': official}, path)
    model = timm.create_model('dat_pp_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **{k: v for k, v in SMALL_ARGS.items()})
    assert torch.equal(model.stages[0].blocks[0].attn.rpb, official['stages.0.attns.0.rpb'])


# ---------------------------------------------------------------- OpenMMLab configs (configs/dat)

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs' / 'dat'
# DAT-T++ widths and heads, one block of each type where the stage has both: runs in seconds
SHALLOW_SPEC = ('ND', 'ND', 'ND', 'D')
# test_heads.py's batches (128 x 160 detection, 128 x 128 segmentation images) and checks are reused


def build_task_model(config_name):
    from test_heads import build_model  # needs the OpenMMLab stack: imported inside the mm tests only
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIG_DIR / config_name))
    assert cfg.model.backbone.model_name == 'dat_pp_tiny' and cfg.model.backbone.out_norm
    cfg.model.backbone.update(pretrained=False, stage_spec=SHALLOW_SPEC)
    if cfg.model.get('test_cfg', {}).get('rcnn'):
        # an untrained box head scores everything below 0.05: keep the top ten, so the mask head runs
        cfg.model.test_cfg.rcnn.update(score_thr=0., max_per_img=10)
    if cfg.default_scope == 'mmseg':
        cfg.model.data_preprocessor.size = (128, 128)  # the configs pad to the 512x512 training crop
    torch.manual_seed(0)
    return build_model(cfg), cfg


def backward_reaches_the_backbone(model, losses):
    from test_heads import backbone_grads, total_loss
    total_loss(model, losses).backward()
    assert all(g is not None and torch.isfinite(g).all() for g in backbone_grads(model))


@pytest.mark.slow  # the costliest config test (CI budget); RetinaNet below runs DAT++ in a detector in CI
@pytest.mark.mm
@needs_mm
def test_mask_rcnn_config_trains_and_predicts():
    from test_heads import check_detections, det_batch
    model, cfg = build_task_model('mask-rcnn_dat-pp-t_fpn_ms-crop-1x_coco.py')
    # the official DAT-Detection recipe (mrcn_tiny_1x_4n_dp00_lr4)
    assert cfg.model.backbone.drop_path_rate == 0.0 and cfg.model.neck.add_extra_convs == 'on_input'
    assert cfg.train_cfg.max_epochs == 12 and cfg.param_scheduler[1].milestones == [8, 11]
    assert cfg.train_dataloader.dataset.pipeline[3].type == 'RandomChoice'
    model.train()
    losses = model(**model.data_preprocessor(det_batch(with_masks=True), training=True), mode='loss')
    assert {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    backward_reaches_the_backbone(model, losses)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(det_batch(with_masks=False), training=False), mode='predict')
    assert all(len(result.pred_instances) for result in results)
    check_detections(results, with_masks=True)


@pytest.mark.mm
@needs_mm
def test_mask_rcnn_3x_config_is_the_1x_recipe_longer():
    """mrcn_tiny_3x_4n_dp03_lr4: drop path 0.3, 36 epochs with steps at 27 / 33, the rest as 1x (built by
    tests/test_heads.py)."""
    from mmengine.config import Config
    short, long = (Config.fromfile(str(CONFIG_DIR / f'mask-rcnn_dat-pp-t_fpn_ms-crop-{s}_coco.py')) for s in ('1x', '3x'))
    assert long.model.backbone.drop_path_rate == 0.3 and long.train_cfg.max_epochs == 36
    assert long.param_scheduler[1].milestones == [27, 33] and long.param_scheduler[1].end == 36
    short.model.backbone.drop_path_rate = 0.3
    assert long.model == short.model and long.optim_wrapper == short.optim_wrapper
    assert long.train_dataloader == short.train_dataloader


@pytest.mark.mm
@needs_mm
def test_retinanet_config_trains_and_predicts():
    from test_heads import check_detections, det_batch
    model, cfg = build_task_model('retinanet_dat-pp-t_fpn_ms-crop-1x_coco.py')
    assert model.backbone.out_channels == (128, 256, 512) and cfg.model.neck.in_channels == [128, 256, 512]
    model.train()
    losses = model(**model.data_preprocessor(det_batch(with_masks=False), training=True), mode='loss')
    assert {'loss_cls', 'loss_bbox'} <= set(losses)
    backward_reaches_the_backbone(model, losses)
    model.eval()
    with torch.no_grad():
        check_detections(model(**model.data_preprocessor(det_batch(with_masks=False), training=False),
                               mode='predict'), with_masks=False)


@pytest.mark.mm
@needs_mm
def test_upernet_config_trains_and_predicts():
    from test_heads import seg_batch
    model, cfg = build_task_model('upernet_dat-pp-t_8xb2-160k_ade20k-512x512.py')
    assert cfg.model.backbone.drop_path_rate == 0.3 and cfg.optim_wrapper.optimizer.lr == 6e-5
    model.train()
    losses = model(**model.data_preprocessor(seg_batch(), training=True), mode='loss')
    assert 'decode.loss_ce' in losses and 'aux.loss_ce' in losses
    backward_reaches_the_backbone(model, losses)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(seg_batch(seed=1), training=False), mode='predict')
    for result in results:
        labels = result.pred_sem_seg.data
        assert tuple(labels.shape) == (1, 128, 128) and 0 <= labels.min() and labels.max() < 150
