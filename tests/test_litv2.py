"""LITv2-specific tests: HiLo and deformable-token-merging semantics against loop references, any-size
behaviour, official (and alpha-sweep) checkpoint conversion, the offset learning-rate groups, and the
OpenMMLab configs under configs/litv2/.

The generic timm API and the parameter counts are covered by the conformance suite (tests/test_models.py).
"""
import math
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

import attnzoo.backbones  # noqa: F401  (registers the litv2_* models)
from attnzoo.backbones.litv2 import (
    DeformableTokenMerging, DeformConv2dPack, HiLo, LITv2Stage, checkpoint_filter_fn, offset_lr_param_groups)
from mm_stack import needs_mm
from official_checkpoints import (
    CHECKPOINT_WRAPS, LITV2_OFFICIAL_ARCH, OFFICIAL_KEY_COUNTS, assert_official_checkpoint_loads,
    assert_official_layout_converts, litv2_official_state_dict, official_parameter_count)

# LITv2-S widths and heads (so stage 3 splits 10 Lo-Fi / 2 Hi-Fi heads), one block per stage
SHALLOW = dict(depths=(1, 1, 1, 1))
# a fraction of LITv2-S for the checkpoint tests: stage 3 has int(4 * 0.9) = 3 Lo-Fi heads and 1 Hi-Fi head
TINY_ARCH = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))


# ---------------------------------------------------------------- HiLo semantics

def reference_hilo(x, attn):
    """Loop-by-loop HiLo on one image: x [H, W, C] -> [H, W, C], from the paper's definition.

    The map sits at the top left of a zero canvas whose sides are multiples of the window. Hi-Fi: each
    pixel attends to the canvas positions of its window (padded ones included, unmasked). Lo-Fi: each
    pixel attends to the window means of the canvas. Output: Hi-Fi channels, then Lo-Fi channels.
    """
    H, W, C = x.shape
    ws, d = attn.window_size, attn.head_dim
    canvas = torch.zeros(math.ceil(H / ws) * ws, math.ceil(W / ws) * ws, C, dtype=x.dtype)
    canvas[:H, :W] = x
    parts = []
    if attn.h_heads:
        qkv = F.linear(canvas, attn.h_qkv.weight, attn.h_qkv.bias).reshape(*canvas.shape[:2], 3, attn.h_heads, d)
        hifi = torch.zeros(H, W, attn.h_heads, d, dtype=x.dtype)
        for i in range(H):
            for j in range(W):
                r0, c0 = i // ws * ws, j // ws * ws
                keys = [(r, c) for r in range(r0, r0 + ws) for c in range(c0, c0 + ws)]
                for h in range(attn.h_heads):
                    logits = torch.stack([qkv[i, j, 0, h] @ qkv[r, c, 1, h] for r, c in keys]) * d ** -0.5
                    weights = logits.softmax(0)
                    hifi[i, j, h] = sum(w * qkv[r, c, 2, h] for w, (r, c) in zip(weights, keys))
        parts.append(F.linear(hifi.reshape(H, W, -1), attn.h_proj.weight, attn.h_proj.bias))
    if attn.l_heads:
        Hp, Wp = canvas.shape[:2]
        means = canvas.reshape(Hp // ws, ws, Wp // ws, ws, C).mean(dim=(1, 3)).reshape(-1, C)
        q = F.linear(x, attn.l_q.weight, attn.l_q.bias).reshape(H, W, attn.l_heads, d)
        k, v = F.linear(means, attn.l_kv.weight, attn.l_kv.bias).reshape(-1, 2, attn.l_heads, d).unbind(1)
        weights = (torch.einsum('ijhd,nhd->ijhn', q, k) * d ** -0.5).softmax(-1)
        lofi = torch.einsum('ijhn,nhd->ijhd', weights, v).reshape(H, W, -1)
        parts.append(F.linear(lofi, attn.l_proj.weight, attn.l_proj.bias))
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('window_size, alpha, H, W', [
    (2, 0.5, 4, 6),    # multiple of the window: nothing padded
    (2, 0.75, 5, 7),   # pad one row and one column
    (3, 0.5, 5, 4),    # window 3: pad 1 row, 2 columns
    (4, 0.5, 3, 3),    # window larger than the map: one window
    (1, 0.9, 3, 5),    # window 1: plain multi-head attention, every head Lo-Fi
    (2, 0.0, 5, 5),    # Hi-Fi only
    (2, 1.0, 5, 5),    # Lo-Fi only (pooled keys)
])
def test_hilo_matches_loop_reference(window_size, alpha, H, W, fused):
    torch.manual_seed(0)
    attn = HiLo(16, num_heads=4, window_size=window_size, alpha=alpha, qkv_bias=True).double().eval()
    attn.fused_attn = fused
    x = torch.randn(2, H, W, 16, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
        for b in range(2):
            torch.testing.assert_close(out[b], reference_hilo(x[b], attn), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('dim, num_heads, window_size, alpha, lofi, hifi', [
    (384, 12, 2, 0.9, 10, 2),   # LITv2-S / M stage 3
    (512, 16, 2, 0.9, 14, 2),   # LITv2-B stage 3
    (768, 24, 1, 0.9, 24, 0),   # stage 4: window 1, all heads Lo-Fi
    (384, 12, 2, 0.5, 6, 6),
    (384, 12, 2, 0.0, 0, 12),
])
def test_hilo_head_split(dim, num_heads, window_size, alpha, lofi, hifi):
    attn = HiLo(dim, num_heads, window_size=window_size, alpha=alpha, qkv_bias=True)
    assert (attn.l_heads, attn.h_heads) == (lofi, hifi)
    names = {name.split('.')[0] for name, _ in attn.named_parameters()}
    assert names == ({'l_q', 'l_kv', 'l_proj'} if lofi else set()) | ({'h_qkv', 'h_proj'} if hifi else set())
    if lofi:
        assert attn.l_q.weight.shape == (lofi * dim // num_heads, dim)
    if hifi:
        assert attn.h_qkv.weight.shape == (3 * hifi * dim // num_heads, dim)


def test_hilo_hifi_channels_come_first():
    """Zeroing the Hi-Fi output projection zeroes exactly the first h_dim output channels."""
    torch.manual_seed(0)
    attn = HiLo(32, num_heads=4, window_size=2, alpha=0.5).eval()
    with torch.no_grad():
        attn.h_proj.weight.zero_()
        attn.h_proj.bias.zero_()
        out = attn(torch.randn(1, 4, 4, 32))
    assert out[..., :16].abs().max() == 0 and out[..., 16:].abs().min() > 0


@pytest.mark.parametrize('kwargs, match', [
    (dict(dim=30, num_heads=4), 'not divisible'),
    (dict(dim=32, num_heads=4, window_size=0), 'window_size'),
    (dict(dim=32, num_heads=4, alpha=1.5), 'alpha'),
])
def test_hilo_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HiLo(**kwargs)


def test_hilo_scripts_and_fx_traces():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 32)
    for kwargs in (dict(window_size=2, alpha=0.9), dict(window_size=1), dict(window_size=3, alpha=0.)):
        attn = HiLo(32, 4, **kwargs).eval()
        with torch.no_grad():
            expected = attn(x)
            torch.testing.assert_close(torch.jit.script(attn)(x), expected)
            traced = timm.layers.create_feature_extractor(attn, return_nodes={'proj_drop': 'out'})
            torch.testing.assert_close(traced(x)['out'], expected)


# ---------------------------------------------------------------- deformable token merging

def reference_deform_conv(x, offset, weight, bias, stride):
    """DCNv1 by loops on one image, no padding: x [C, H, W], offset [2 * k * k, Ho, Wo] laid out
    (dy, dx) per kernel tap in row-major order (the official DCN's layout); bilinear sampling, zero outside."""
    C, H, W = x.shape
    k = weight.shape[-1]
    Ho, Wo = offset.shape[1:]

    def pixel(r, c):
        return x[:, r, c] if 0 <= r < H and 0 <= c < W else torch.zeros(C, dtype=x.dtype)

    out = torch.zeros(weight.shape[0], Ho, Wo, dtype=x.dtype)
    for i in range(Ho):
        for j in range(Wo):
            acc = bias.clone()
            for a in range(k):
                for b in range(k):
                    tap = a * k + b
                    y = i * stride + a + offset[2 * tap, i, j]
                    z = j * stride + b + offset[2 * tap + 1, i, j]
                    if not (-1 < y < H and -1 < z < W):
                        continue
                    y0, z0 = math.floor(y), math.floor(z)
                    fy, fz = y - y0, z - z0
                    sample = ((1 - fy) * (1 - fz) * pixel(y0, z0) + (1 - fy) * fz * pixel(y0, z0 + 1)
                              + fy * (1 - fz) * pixel(y0 + 1, z0) + fy * fz * pixel(y0 + 1, z0 + 1))
                    acc = acc + weight[:, :, a, b] @ sample
            out[:, i, j] = acc
    return out


def test_deform_conv_offsets_start_at_zero():
    """Freshly built, the deformable conv is the plain strided conv with the same weights."""
    torch.manual_seed(0)
    conv = DeformConv2dPack(6, 10, kernel_size=2, stride=2)
    assert conv.conv_offset.weight.abs().max() == 0 and conv.conv_offset.bias.abs().max() == 0
    x = torch.randn(2, 6, 9, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, stride=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('offset_scale', [0.3, 3.0])  # sub-pixel, and far enough to sample outside the map
def test_deform_conv_matches_loop_reference(offset_scale):
    torch.manual_seed(0)
    conv = DeformConv2dPack(3, 4, kernel_size=2, stride=2).double()
    with torch.no_grad():
        conv.conv_offset.weight.normal_(0, offset_scale)
        conv.conv_offset.bias.normal_(0, offset_scale)
    x = torch.randn(1, 3, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        out = conv(x)
        offset = conv.conv_offset(x)[0]
    assert out.shape == (1, 4, 3, 3)
    ref = reference_deform_conv(x[0], offset, conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)


def test_token_merging_is_conv_bn_gelu_channels_last():
    torch.manual_seed(0)
    merge = DeformableTokenMerging(8, 16).eval()
    with torch.no_grad():
        merge.norm.running_mean.normal_()
        merge.norm.running_var.uniform_(0.5, 2.)
        x = torch.randn(2, 11, 6, 8)  # odd height: floored, as the official dense backbones
        out = merge(x)
        ref = F.gelu(merge.norm(F.conv2d(x.permute(0, 3, 1, 2), merge.dconv.weight, merge.dconv.bias, stride=2)))
    assert out.shape == (2, 5, 3, 16)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_stage_scripts_and_fx_traces_at_any_size():
    """Window padding and the deformable convolution are leaf calls in the FX graph, not frozen at
    the size traced: the graph and the scripted stage agree with eager at sizes needing other pads."""
    torch.manual_seed(0)
    stage = LITv2Stage(16, 32, depth=2, num_heads=4, window_size=2).eval()
    scripted = torch.jit.script(stage)
    traced = torch.fx.symbolic_trace(stage)
    features = timm.layers.create_feature_extractor(stage, return_nodes={'blocks': 'out'})
    for size in [(10, 14), (9, 13), (14, 6)]:  # maps of 5x7 / 4x6 / 7x3 after the token merging
        x = torch.randn(2, *size, 16)
        with torch.no_grad():
            expected = stage(x)
            torch.testing.assert_close(scripted(x), expected)
            torch.testing.assert_close(traced(x), expected)
            torch.testing.assert_close(features(x)['out'], expected)


# ---------------------------------------------------------------- model structure and any size

def windows_of(model):
    return [stage.blocks[0].attn.window_size if stage.blocks[0].attn is not None else 0 for stage in model.stages]


def test_attention_free_early_stages_and_default_windows():
    model = timm.create_model('litv2_small', **SHALLOW)
    assert windows_of(model) == [0, 0, 2, 1]
    for i in (0, 1):
        assert not any('attn' in name or 'norm1' in name for name, _ in model.stages[i].named_parameters())
    attn3, attn4 = model.stages[2].blocks[0].attn, model.stages[3].blocks[0].attn
    assert (attn3.l_heads, attn3.h_heads) == (10, 2) and (attn4.l_heads, attn4.h_heads) == (24, 0)
    assert isinstance(model.stages[0].downsample, torch.nn.Identity)
    assert all(isinstance(model.stages[i].downsample, DeformableTokenMerging) for i in (1, 2, 3))


@pytest.mark.parametrize('window_size, expected', [(4, [0, 0, 4, 1]), ((0, 2, 2, 1), [0, 2, 2, 1])])
def test_window_size_kwarg(window_size, expected):
    model = timm.create_model('litv2_small', window_size=window_size, **SHALLOW)
    assert windows_of(model) == expected
    default = timm.create_model('litv2_small', **SHALLOW)
    if expected[:2] == [0, 0]:  # windows own no parameters
        assert [(k, v.shape) for k, v in model.state_dict().items()] == \
               [(k, v.shape) for k, v in default.state_dict().items()]


@pytest.mark.parametrize('window_size', [(0, 0, 2), (0, 0, -1, 1), 2.5])
def test_bad_window_size(window_size):
    with pytest.raises(ValueError, match='window_size'):
        timm.create_model('litv2_small', window_size=window_size, **SHALLOW)


@pytest.mark.parametrize('size, expected', [
    # the stem pads to a multiple of 4 (ceil), each merge floors, as the official dense backbones
    ((230, 190), [(58, 48), (29, 24), (14, 12), (7, 6)]),
    ((97, 161), [(25, 41), (12, 20), (6, 10), (3, 5)]),
    ((45, 33), [(12, 9), (6, 4), (3, 2), (1, 1)]),
])
def test_features_only_at_odd_sizes(size, expected):
    model = timm.create_model('litv2_small', features_only=True, window_size=4, **SHALLOW).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    assert [tuple(f.shape[2:]) for f in features] == expected
    assert [f.shape[1] for f in features] == [96, 192, 384, 768]
    assert all(torch.isfinite(f).all() for f in features)


def test_stem_pads_bottom_right():
    """An image that is not a multiple of 4 gives what the same image zero-padded at the bottom / right gives."""
    torch.manual_seed(0)
    model = timm.create_model('litv2_small', **SHALLOW).eval()
    x = torch.randn(1, 3, 62, 59)
    with torch.no_grad():
        torch.testing.assert_close(model.stem(x), model.stem(F.pad(x, (0, 1, 0, 2))), rtol=0, atol=0)


# ---------------------------------------------------------------- official checkpoints

# official key -> ours, for a few keys of every kind
KEY_SAMPLES = {
    'patch_embed.proj.weight': 'stem.proj.weight',
    'patch_embed.norm.bias': 'stem.norm.bias',
    'layers.0.blocks.1.mlp.dwconv.dwconv.weight': 'stages.0.blocks.1.mlp.dwconv.weight',
    'layers.1.blocks.0.norm2.weight': 'stages.1.blocks.0.norm2.weight',
    'layers.0.downsample.dconv.weight': 'stages.1.downsample.dconv.weight',
    'layers.1.downsample.dconv.conv_offset.bias': 'stages.2.downsample.dconv.conv_offset.bias',
    'layers.2.downsample.norm_layer.running_var': 'stages.3.downsample.norm.running_var',
    'layers.2.downsample.norm_layer.num_batches_tracked': 'stages.3.downsample.norm.num_batches_tracked',
    'layers.2.blocks.5.attn.h_qkv.weight': 'stages.2.blocks.5.attn.h_qkv.weight',
    'layers.2.blocks.3.attn.l_kv.bias': 'stages.2.blocks.3.attn.l_kv.bias',
    'layers.3.blocks.1.attn.l_proj.weight': 'stages.3.blocks.1.attn.l_proj.weight',
    'layers.3.blocks.0.norm1.weight': 'stages.3.blocks.0.norm1.weight',
    'norm.weight': 'norm.weight',
    'head.weight': 'head.fc.weight',
}


@pytest.fixture(scope='module')
def litv2_small():
    return timm.create_model('litv2_small')


@pytest.fixture(scope='module')
def official_small():
    return litv2_official_state_dict(**LITV2_OFFICIAL_ARCH['litv2_small'])


@pytest.mark.parametrize('wrap', CHECKPOINT_WRAPS)
def test_official_litv2_small_checkpoint_loads_strictly(litv2_small, official_small, wrap):
    assert len(official_small) == OFFICIAL_KEY_COUNTS['litv2_small']
    assert_official_checkpoint_loads(official_small, litv2_small, checkpoint_filter_fn, wrap, KEY_SAMPLES)


@pytest.mark.parametrize('name', sorted(LITV2_OFFICIAL_ARCH))
def test_official_layout_of_every_size_converts(name):
    assert_official_layout_converts(name, timm.create_model(name, device='meta'), checkpoint_filter_fn)


# len(state_dict) and parameters of the official LITv2-S at the sweep's ends (instantiated from the official
# code, as OFFICIAL_KEY_COUNTS): no Lo-Fi / no Hi-Fi projections in stage 3
OFFICIAL_SWEEP_ENDS = {0.0: (183, 28_089_760), 1.0: (195, 28_089_760)}


@pytest.mark.parametrize('alpha', sorted(OFFICIAL_SWEEP_ENDS))
def test_alpha_sweep_layout_converts(alpha):
    official = litv2_official_state_dict(**LITV2_OFFICIAL_ARCH['litv2_small'], alpha=alpha, device='meta')
    keys, params = OFFICIAL_SWEEP_ENDS[alpha]
    assert len(official) == keys
    assert official_parameter_count(official) == params
    model = timm.create_model('litv2_small', alpha=alpha, device='meta')
    converted = checkpoint_filter_fn(official, model)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize('alpha', [0.0, 0.2, 0.5, 1.0])
def test_alpha_sweep_checkpoint_loads_with_its_alpha(alpha):
    sd = litv2_official_state_dict(**TINY_ARCH, alpha=alpha)
    model = timm.create_model('litv2_small', alpha=alpha, **TINY_ARCH)
    model.load_state_dict(checkpoint_filter_fn({'model': sd}, model), strict=True)
    assert torch.equal(model.stages[2].blocks[1].norm1.weight, sd['layers.2.blocks.1.norm1.weight'])


@pytest.mark.parametrize('alpha, lofi_heads', [(0.0, 0), (0.5, 2), (1.0, 4)])
def test_alpha_sweep_checkpoint_with_wrong_alpha_says_which_alpha(alpha, lofi_heads):
    sd = litv2_official_state_dict(**TINY_ARCH, alpha=alpha)
    model = timm.create_model('litv2_small', **TINY_ARCH)  # alpha 0.9: 3 Lo-Fi heads of 4
    with pytest.raises(ValueError, match=rf'stages\.2\.blocks\.0\.attn has {lofi_heads} Lo-Fi heads of 4, this '
                                         rf'model 3 .* alpha={alpha}'):
        checkpoint_filter_fn({'model': sd}, model)


def test_alpha_sweep_tags():
    model = timm.create_model('litv2_small.alpha0_5_in1k', **SHALLOW)
    assert model.stages[2].blocks[0].attn.l_heads == 6
    assert model.pretrained_cfg['url'] == 'https://github.com/ziplab/LITv2/releases/download/v1.1/alpha_0.5.pth'
    assert timm.create_model('litv2_small.alpha0_in1k', **SHALLOW).stages[2].blocks[0].attn.l_heads == 0
    assert timm.get_pretrained_cfg('litv2_small.alpha1_in1k').url.endswith('v1.1/alpha_1.pth')
    assert timm.create_model('litv2_small', **SHALLOW).stages[2].blocks[0].attn.l_heads == 10


def test_pretrained_loads_official_file(tmp_path):
    sd = litv2_official_state_dict(**TINY_ARCH)
    path = tmp_path / 'litv2_official_format.pth'
    torch.save({'model': sd, 'epoch': 299}, path)
    model = timm.create_model(
        'litv2_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY_ARCH)
    assert torch.equal(model.stages[2].blocks[1].attn.h_qkv.weight, sd['layers.2.blocks.1.attn.h_qkv.weight'])
    assert torch.equal(model.stages[1].downsample.dconv.conv_offset.weight,
                       sd['layers.0.downsample.dconv.conv_offset.weight'])
    assert torch.equal(model.head.fc.weight, sd['head.weight'])

    # a new head and another window: timm drops the official classifier, windows own no parameters
    model = timm.create_model('litv2_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              num_classes=7, window_size=4, **TINY_ARCH)
    assert model.head.fc.weight.shape == (7, 128)
    assert torch.equal(model.stem.proj.weight, sd['patch_embed.proj.weight'])


def test_mismatched_checkpoint_names_the_keys():
    model = timm.create_model('litv2_small', **TINY_ARCH)
    sd = litv2_official_state_dict(**TINY_ARCH)
    sd['layers.0.blocks.0.attn.l_q.weight'] = sd.pop('layers.0.blocks.0.norm2.weight')
    with pytest.raises(ValueError, match=r'1 missing keys .*stages\.0\.blocks\.0\.norm2\.weight'
                                         r'.*1 unexpected keys .*stages\.0\.blocks\.0\.attn\.l_q'):
        checkpoint_filter_fn(sd, model)


def test_pretrained_cfgs_point_at_official_release():
    for name, file, size, crop in (('litv2_small', 'litv2_s', 224, 0.875), ('litv2_medium', 'litv2_m', 224, 0.875),
                                   ('litv2_base', 'litv2_b', 224, 0.875), ('litv2_base_384', 'litv2_b_384', 384, 1.0)):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == f'https://github.com/ziplab/LITv2/releases/download/v1.0/{file}.pth'
        assert cfg.input_size == (3, size, size) and cfg.crop_pct == crop and cfg.interpolation == 'bicubic'
        assert cfg.num_classes == 1000 and cfg.license == 'apache-2.0'


# ---------------------------------------------------------------- the offset conv's learning rate

def test_offset_lr_param_groups():
    model = timm.create_model('litv2_small', **TINY_ARCH)
    groups = offset_lr_param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for group in groups for p in group['params']]
    assert sorted(grouped) == sorted(names.values())  # every parameter, once
    offset_groups = [g for g in groups if 'lr_scale' in g]
    assert len(offset_groups) == 1
    assert offset_groups[0]['lr_scale'] == 0.01 and offset_groups[0]['weight_decay'] == 0.05
    assert sorted(names[id(p)] for p in offset_groups[0]['params']) == [
        f'stages.{i}.downsample.dconv.conv_offset.weight' for i in (1, 2, 3)]
    # the offset biases stay at the full rate without weight decay, as in the official recipe
    no_decay = next(g for g in groups if g['weight_decay'] == 0.)
    assert 'stages.1.downsample.dconv.conv_offset.bias' in {names[id(p)] for p in no_decay['params']}


def test_offset_lr_scale_reaches_the_optimizer_through_timm():
    model = timm.create_model('litv2_small', **TINY_ARCH)
    optimizer = timm.optim.create_optimizer_v2(
        model, 'adamw', lr=1e-3, weight_decay=0.05, param_group_fn=partial(offset_lr_param_groups, weight_decay=0.05))
    scheduler = CosineLRScheduler(optimizer, t_initial=100)
    scheduler.step(0)
    lrs = sorted({group['lr'] for group in optimizer.param_groups})
    assert lrs == pytest.approx([1e-5, 1e-3])


def test_layer_decay_groups_follow_depth():
    """timm's layer-wise decay through group_matcher: the stem decays most, each stage's token merging
    shares its first block's rate, blocks rise in depth order, the final norm shares the last block's
    rate (timm's MATCH_PREV_GROUP) and the head keeps the full rate."""
    model = timm.create_model('litv2_small', **TINY_ARCH)  # depths (1, 1, 2, 1)
    groups = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, layer_decay=0.5).param_groups
    scale_of = {id(p): group['lr_scale'] for group in groups for p in group['params']}
    scale = {name: scale_of[id(p)] for name, p in model.named_parameters()}
    ordered = ['stem.proj.weight', 'stages.0.blocks.0.mlp.fc1.weight', 'stages.1.blocks.0.mlp.fc1.weight',
               'stages.2.blocks.0.mlp.fc1.weight', 'stages.2.blocks.1.mlp.fc1.weight',
               'stages.3.blocks.0.mlp.fc1.weight']
    assert [scale[n] for n in ordered] == pytest.approx([0.5 ** (6 - i) for i in range(6)])
    assert scale['norm.weight'] == scale['stages.3.blocks.0.mlp.fc1.weight']
    assert scale['stages.2.downsample.dconv.weight'] == scale['stages.2.blocks.0.mlp.fc1.weight']
    assert scale['head.fc.weight'] == 1.0


# ---------------------------------------------------------------- OpenMMLab configs

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs' / 'litv2'
# the official README's table: (task prefix, variant, window)
OFFICIAL_DENSE = [(task, size, ws) for task in ('retinanet', 'mask-rcnn') for size in 'smb' for ws in (2, 4)] + [
    ('fpn', size, 2) for size in 'smb']
MODEL_NAMES = {'s': 'litv2_small', 'm': 'litv2_medium', 'b': 'litv2_base'}


def config_file(task, size, ws):
    suffix = {'retinanet': 'fpn_1x_coco', 'mask-rcnn': 'fpn_1x_coco', 'fpn': '8xb2-80k_ade20k-512x512'}[task]
    return CONFIG_DIR / f'{task}_litv2-{size}-ws{ws}_{suffix}.py'


def test_every_official_dense_setting_has_a_config():
    expected = {config_file(*setting) for setting in OFFICIAL_DENSE}
    assert set(CONFIG_DIR.glob('*.py')) == expected


@pytest.mark.mm
@needs_mm
@pytest.mark.parametrize('task, size, ws', OFFICIAL_DENSE, ids=lambda v: str(v))
def test_config_sets_the_official_backbone(task, size, ws):
    from mmengine.config import Config
    cfg = Config.fromfile(str(config_file(task, size, ws)))
    backbone = cfg.model.backbone
    assert backbone.type == 'AttnzooBackbone' and backbone.model_name == MODEL_NAMES[size]
    assert backbone.get('window_size', 2) == ws
    assert backbone.drop_path_rate == (0.3 if size == 'b' else 0.2)
    assert backbone.out_norm
    with torch.device('meta'):
        model = timm.create_model(backbone.model_name, window_size=ws)
    assert windows_of(model) == [0, 0, ws, 1]
    channels = [96 * 2 ** i if size != 'b' else 128 * 2 ** i for i in range(4)]
    in_channels = cfg.model.neck.in_channels
    assert list(in_channels) == [channels[i] for i in backbone.out_indices]


@pytest.mark.mm
@needs_mm
# Mask R-CNN adds only mmdet's RoI heads to what the RetinaNet case checks of the backbone: slow
@pytest.mark.parametrize('task', ['retinanet', pytest.param('mask-rcnn', marks=pytest.mark.slow), 'fpn'])
def test_small_config_trains_and_predicts_on_cpu(task):
    """LITv2-S (one block per stage) in each task model: a loss with gradients on every backbone
    parameter that takes part, and predictions, on tiny inputs."""
    import numpy as np
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmengine.structures import InstanceData, PixelData
    from mmseg.structures import SegDataSample
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    import attnzoo.heads  # noqa: F401

    torch.manual_seed(0)
    # window 4 where the official README has it (detection): HiLo then pads the 6 x 8 stage-3 map to 8 x 8
    cfg = Config.fromfile(str(config_file(task, 's', 2 if task == 'fpn' else 4)))
    cfg.model.backbone.update(pretrained=False, **SHALLOW)
    if task == 'mask-rcnn':
        cfg.model.test_cfg.rcnn.update(score_thr=0., max_per_img=10)
    registry = DET_MODELS if cfg.default_scope == 'mmdet' else SEG_MODELS
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = registry.build(cfg.model)
    h, w = 96, 128
    generator = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator))
        if task == 'fpn':
            sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, h, w), generator=generator))
        else:
            sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.)))
            boxes = torch.tensor([[10., 20., 70., 90.], [60., 10., 120., 80.]])
            gt = InstanceData(bboxes=boxes, labels=torch.tensor([1, 5]))
            if task == 'mask-rcnn':
                masks = np.zeros((2, h, w), dtype=np.uint8)
                for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                    masks[i, y0:y1, x0:x1] = 1
                gt.masks = BitmapMasks(masks, h, w)
            sample.gt_instances = gt
        samples.append(sample)
    batch = dict(inputs=inputs, data_samples=samples)

    model.train()
    data = model.data_preprocessor(batch, training=True)
    loss, _ = model.parse_losses(model(**data, mode='loss'))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(batch, training=False)
        results = model(**data, mode='predict')
    assert len(results) == 2
    for result in results:
        if task == 'fpn':
            assert result.pred_sem_seg.data.shape == (1, h, w)
        else:
            assert torch.isfinite(result.pred_instances.bboxes).all()
