"""CSWin-specific tests: stripe attention semantics, odd-size padding, official checkpoint conversion.

The generic timm API and the parameter counts are covered by the conformance suite.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import timm

import attnzoo.backbones  # noqa: F401  (registers the cswin_* models)
from attnzoo.backbones.cswin import CrossShapedWindowAttention, StripeAttention, checkpoint_filter_fn
from official_checkpoints import (CHECKPOINT_WRAPS, CSWIN_OFFICIAL_ARCH, OFFICIAL_KEY_COUNTS,
                                  assert_official_checkpoint_loads, assert_official_layout_converts,
                                  cswin_official_state_dict)

TINY_ARCH = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4))


# ---------------------------------------------------------------- stripe attention semantics

def dense_stripe_attention(qkv, lepe_weight, lepe_bias, num_heads, window):
    """Loop-by-loop reference for one branch on one image: qkv [H, W, 3, C] -> [H, W, C].

    The map sits centred in a zero canvas whose sides are multiples of the window; each pixel
    attends to every canvas position of its window (zero keys included, no mask), and LePE sums the
    3x3 neighbours of the pixel that lie inside the same window.
    """
    H, W, _, C = qkv.shape
    win_h, win_w = window
    canvas_h, canvas_w = math.ceil(H / win_h) * win_h, math.ceil(W / win_w) * win_w
    top, left = (canvas_h - H) // 2, (canvas_w - W) // 2
    canvas = torch.zeros(canvas_h, canvas_w, 3, C, dtype=qkv.dtype)
    canvas[top:top + H, left:left + W] = qkv
    q, k, v = canvas.unbind(2)
    head_dim = C // num_heads
    out = torch.zeros(H, W, C, dtype=qkv.dtype)
    for i in range(H):
        for j in range(W):
            ci, cj = i + top, j + left
            r0, c0 = ci // win_h * win_h, cj // win_w * win_w
            keys = [(r, c) for r in range(r0, r0 + win_h) for c in range(c0, c0 + win_w)]
            for h in range(num_heads):
                ch = slice(h * head_dim, (h + 1) * head_dim)
                logits = torch.stack([q[ci, cj, ch] @ k[r, c, ch] for r, c in keys]) * head_dim ** -0.5
                weights = logits.softmax(0)
                out[i, j, ch] = sum(w * v[r, c, ch] for w, (r, c) in zip(weights, keys))
            lepe = lepe_bias.clone()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    r, c = ci + di, cj + dj
                    if r0 <= r < r0 + win_h and c0 <= c < c0 + win_w:
                        lepe += lepe_weight[:, 0, di + 1, dj + 1] * v[r, c]
            out[i, j] += lepe
    return out


def _window(orientation, stripe_width, H, W):
    return {'vertical': (H, stripe_width), 'horizontal': (stripe_width, W), 'full': (H, W)}[orientation]


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('orientation,stripe_width,H,W', [
    ('vertical', 2, 4, 6),     # multiple of the stripe: no padding
    ('vertical', 4, 5, 7),     # pad 1: 0 left, 1 right
    ('horizontal', 4, 5, 6),   # pad 3: 1 top, 2 bottom
    ('vertical', 1, 3, 5),     # 1-wide stripes: LePE sees only the column
    ('horizontal', 7, 3, 5),   # stripe wider than the map
    ('full', 0, 3, 5),
])
def test_stripe_attention_matches_dense_reference(orientation, stripe_width, H, W, fused):
    torch.manual_seed(0)
    dim, heads = 4, 2
    branch = StripeAttention(dim, heads, orientation, stripe_width).eval()
    branch.fused_attn = fused
    with torch.no_grad():
        branch.lepe.weight.normal_()
        branch.lepe.bias.normal_()
    qkv = torch.randn(2, H, W, 3, dim, dtype=torch.float64)
    branch.double()
    with torch.no_grad():
        out = branch(qkv)
    window = _window(orientation, stripe_width, H, W)
    for b in range(2):
        ref = dense_stripe_attention(qkv[b], branch.lepe.weight, branch.lepe.bias, heads, window)
        torch.testing.assert_close(out[b], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('orientation', ['vertical', 'horizontal'])
def test_padding_is_centred_and_cropped_back(orientation):
    """An odd map gives what the same map explicitly zero-padded (centred) to a stripe multiple gives, cropped."""
    torch.manual_seed(0)
    branch = StripeAttention(8, 2, orientation, stripe_width=4).eval()
    H, W = 7, 9  # pads to 8 (0 + 1) rows or 12 (1 + 2) columns
    qkv = torch.randn(1, H, W, 3, 8)
    pad = (0, 0, 0, 0, 1, 2, 0, 0) if orientation == 'vertical' else (0, 0, 0, 0, 0, 0, 0, 1)
    with torch.no_grad():
        out = branch(qkv)
        padded_out = branch(F.pad(qkv, pad))
    top, left = pad[6], pad[4]
    torch.testing.assert_close(out, padded_out[:, top:top + H, left:left + W], rtol=0, atol=1e-6)


def test_cross_shaped_attention_splits_channels_and_heads():
    """Channels [:C/2] with half the heads attend in vertical stripes, [C/2:] in horizontal ones."""
    torch.manual_seed(0)
    dim, heads, sw, H, W = 8, 4, 2, 5, 4
    attn = CrossShapedWindowAttention(dim, heads, split_size=sw).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(1, H, W, dim, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
        qkv = F.linear(x[0], attn.qkv.weight, attn.qkv.bias).reshape(H, W, 3, dim)
        halves = []
        for branch, channels, window in ((0, slice(0, dim // 2), (H, sw)), (1, slice(dim // 2, dim), (sw, W))):
            lepe = attn.branches[branch].lepe
            halves.append(dense_stripe_attention(qkv[..., channels], lepe.weight, lepe.bias, heads // 2, window))
        ref = F.linear(torch.cat(halves, -1), attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- model behaviour at any size

def _conv_out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def test_odd_input_size_pyramid():
    model = timm.create_model('cswin_tiny_224', pretrained=False, num_classes=5, **TINY_ARCH).eval()
    H, W = 230, 190
    with torch.no_grad():
        logits = model(torch.randn(1, 3, H, W))
        feats = model.forward_intermediates(torch.randn(1, 3, H, W), intermediates_only=True)
    assert logits.shape == (1, 5) and torch.isfinite(logits).all()
    h, w = _conv_out(H, 7, 4, 2), _conv_out(W, 7, 4, 2)  # official stem: 7x7, stride 4, padding 2
    for i, feat in enumerate(feats):
        if i:
            h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
        assert feat.shape == (1, 16 * 2 ** i, h, w)
        assert torch.isfinite(feat).all()


def test_features_only_at_odd_size():
    model = timm.create_model('cswin_tiny_224', pretrained=False, features_only=True, out_indices=(1, 3), **TINY_ARCH)
    feats = model(torch.randn(2, 3, 97, 161))
    assert [f.shape for f in feats] == [(2, 32, 12, 20), (2, 128, 3, 5)]
    assert model.feature_info.reduction() == [8, 32]


def test_stripe_last_stage_option():
    model = timm.create_model(
        'cswin_tiny_224', pretrained=False, last_stage_full_attention=False, split_size=(1, 2, 3, 2), **TINY_ARCH)
    last_attn = model.stages[3].blocks[0].attn
    assert [b.orientation for b in last_attn.branches] == ['vertical', 'horizontal']
    assert [b.stripe_width for b in model.stages[2].blocks[0].attn.branches] == [3, 3]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 100, 70))
    assert torch.isfinite(out).all()
    default = timm.create_model('cswin_tiny_224', pretrained=False, **TINY_ARCH)
    assert [b.orientation for b in default.stages[3].blocks[0].attn.branches] == ['full']


def test_stripe_stage_needs_even_heads():
    with pytest.raises(ValueError, match='must both be even'):
        timm.create_model('cswin_tiny_224', pretrained=False, embed_dim=16, num_heads=(1, 2, 4, 4))


@pytest.mark.parametrize('shape,match', [
    ((1, 1, 64, 64), '3-channel images but got 1 channels'),
    ((1, 3, 31, 64), 'at least 32x32 pixels'),
    ((3, 64, 64), r'expects images \[B, C, H, W\]'),
])
def test_bad_input_raises(shape, match):
    model = timm.create_model('cswin_tiny_224', pretrained=False, **TINY_ARCH)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))
    with pytest.raises(ValueError, match=match):
        model.forward_intermediates(torch.randn(*shape))


def test_in_chans_is_respected():
    model = timm.create_model('cswin_tiny_224', pretrained=False, in_chans=1, **TINY_ARCH)
    assert model.stem.conv.weight.shape[1] == 1
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


# ---------------------------------------------------------------- official checkpoints

# official key -> ours, for a few keys of every kind
KEY_SAMPLES = {
    'stage1_conv_embed.0.weight': 'stem.conv.weight',
    'stage1_conv_embed.2.bias': 'stem.norm.bias',
    'merge1.conv.weight': 'stages.1.downsample.conv.weight',
    'merge3.norm.weight': 'stages.3.downsample.norm.weight',
    'stage1.0.attns.0.get_v.weight': 'stages.0.blocks.0.attn.branches.0.lepe.weight',
    'stage3.20.attns.1.get_v.bias': 'stages.2.blocks.20.attn.branches.1.lepe.bias',
    'stage4.0.attns.0.get_v.weight': 'stages.3.blocks.0.attn.branches.0.lepe.weight',
    'stage2.1.qkv.weight': 'stages.1.blocks.1.attn.qkv.weight',
    'stage3.7.proj.bias': 'stages.2.blocks.7.attn.proj.bias',
    'stage3.7.norm2.weight': 'stages.2.blocks.7.norm2.weight',
    'stage4.0.mlp.fc2.weight': 'stages.3.blocks.0.mlp.fc2.weight',
    'norm.weight': 'norm.weight',
    'head.weight': 'head.fc.weight',
}


@pytest.fixture(scope='module')
def cswin_tiny():
    return timm.create_model('cswin_tiny_224', pretrained=False)


@pytest.fixture(scope='module')
def official_tiny():
    return cswin_official_state_dict(**CSWIN_OFFICIAL_ARCH['cswin_tiny_224'])


@pytest.mark.parametrize('wrap', CHECKPOINT_WRAPS)
def test_official_cswin_tiny_checkpoint_loads_strictly(cswin_tiny, official_tiny, wrap):
    assert len(official_tiny) == OFFICIAL_KEY_COUNTS['cswin_tiny_224']
    assert_official_checkpoint_loads(official_tiny, cswin_tiny, checkpoint_filter_fn, wrap, KEY_SAMPLES)


@pytest.mark.parametrize('name', sorted(CSWIN_OFFICIAL_ARCH))
def test_official_layout_of_every_size_converts(name):
    assert_official_layout_converts(name, timm.create_model(name, device='meta'), checkpoint_filter_fn)


def test_a_file_with_both_weights_gives_the_ema_ones(tmp_path):
    """The official saver writes 'state_dict' and 'state_dict_ema'; the official evaluation (main.py,
    --model-ema on by default) and fine-tuning recipes (--ema-finetune) take the EMA weights, as timm's
    own file loader does: a URL (whole file through the filter) and a local file must agree."""
    weights = cswin_official_state_dict(16, TINY_ARCH['depths'], seed=1)
    ema = cswin_official_state_dict(16, TINY_ARCH['depths'], seed=2)
    checkpoint = {'state_dict': weights, 'state_dict_ema': ema, 'epoch': 300}
    model = timm.create_model('cswin_tiny_224', pretrained=False, **TINY_ARCH)
    converted = checkpoint_filter_fn(checkpoint, model)
    assert torch.equal(converted['stem.conv.weight'], ema['stage1_conv_embed.0.weight'])
    assert torch.equal(converted['stages.2.blocks.1.attn.branches.1.lepe.weight'], ema['stage3.1.attns.1.get_v.weight'])

    path = tmp_path / 'official_with_ema.pth'
    torch.save(checkpoint, path)
    from_file = timm.create_model(
        'cswin_tiny_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY_ARCH)
    for name, value in from_file.state_dict().items():
        assert torch.equal(value, converted[name]), name


def test_own_state_dict_passes_through_unchanged():
    model = timm.create_model('cswin_tiny_224', pretrained=False, **TINY_ARCH)
    sd = model.state_dict()
    converted = checkpoint_filter_fn(sd, model)
    assert list(converted) == list(sd)
    assert all(converted[k] is sd[k] for k in sd)


def test_mismatched_checkpoint_names_the_keys():
    model = timm.create_model('cswin_tiny_224', pretrained=False, **TINY_ARCH)
    sd = cswin_official_state_dict(16, TINY_ARCH['depths'])
    del sd['stage2.0.attns.1.get_v.weight']
    sd['stage2.0.attns.2.get_v.weight'] = torch.zeros(16, 1, 3, 3)
    with pytest.raises(ValueError, match=r'1 missing keys .*stages\.1\.blocks\.0\.attn\.branches\.1\.lepe\.weight'
                                         r'.*1 unexpected keys .*stages\.1\.blocks\.0\.attn\.branches\.2'):
        checkpoint_filter_fn(sd, model)


def test_official_checkpoint_needs_full_attention_last_stage():
    model = timm.create_model('cswin_tiny_224', pretrained=False, last_stage_full_attention=False, **TINY_ARCH)
    with pytest.raises(ValueError, match=r'missing keys .*stages\.3\.blocks\.0\.attn\.branches\.1\.lepe'):
        checkpoint_filter_fn(cswin_official_state_dict(16, TINY_ARCH['depths']), model)


def test_pretrained_loads_official_file(tmp_path):
    sd = cswin_official_state_dict(16, TINY_ARCH['depths'])
    path = tmp_path / 'cswin_official_format.pth'
    torch.save({'state_dict': sd, 'epoch': 300}, path)
    model = timm.create_model(
        'cswin_tiny_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY_ARCH)
    assert torch.equal(model.stages[2].blocks[1].attn.branches[1].lepe.weight, sd['stage3.1.attns.1.get_v.weight'])
    assert torch.equal(model.head.fc.weight, sd['head.weight'])

    # a new head: timm drops the official classifier and keeps the rest
    model = timm.create_model(
        'cswin_tiny_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=7, **TINY_ARCH)
    assert model.head.fc.weight.shape == (7, 128)
    assert torch.equal(model.stem.conv.weight, sd['stage1_conv_embed.0.weight'])


def test_pretrained_cfgs_point_at_official_release():
    for name, size, crop in (('cswin_tiny_224', 224, 0.9), ('cswin_base_384', 384, 1.0),
                             ('cswin_large_224', 224, 0.9)):
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.url == f'https://github.com/microsoft/CSWin-Transformer/releases/download/v0.1.0/{name}.pth'
        assert cfg.input_size == (3, size, size) and cfg.crop_pct == crop
        assert cfg.num_classes == 1000 and cfg.license == 'mit'
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
