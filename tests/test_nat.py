"""NAT / DiNAT specifics: official checkpoint keys, the attention layer against a dense masked softmax
with NATTEN's window and bias rule, and DiNAT's dilated layers on maps smaller than the dilated window.

The generic timm API and the parameter counts are covered by the conformance suite.
"""
import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo.backbones  # noqa: F401  (registers the models)
import attnzoo.kernels
from attnzoo.backbones.nat import NAT, NATBlock, NeighborhoodAttention, checkpoint_filter_fn
from official_checkpoints import (NAT_OFFICIAL_ARCH, assert_official_layout_converts, nat_official_state_dict,
                                  wrap_as_saved)


@functools.lru_cache(maxsize=None)
def meta_model(name):
    """The variant on the meta device: its structure, built in a fraction of the time."""
    return timm.create_model(name, device='meta')


# a small NAT with LayerScale (head_dim 16, the smallest the op takes)
TINY_ARGS = dict(embed_dim=32, depths=(1, 2, 1, 1), num_heads=(2, 4, 8, 16), mlp_ratio=2., kernel_size=3,
                 layer_scale=1e-5, num_classes=10)


@pytest.mark.parametrize('wrap', ['plain', 'model', 'state_dict_module'])
def test_official_checkpoint_converts_and_loads_strictly(wrap):
    official = nat_official_state_dict(**TINY_ARGS)
    model = NAT(**TINY_ARGS)
    model.load_state_dict(checkpoint_filter_fn(wrap_as_saved(official, wrap), model), strict=True)

    # the official downsample closes level i, ours opens stage i + 1
    assert torch.equal(model.stem.conv2.weight, official['patch_embed.proj.1.weight'])
    assert torch.equal(model.stages[1].downsample.conv.weight, official['levels.0.downsample.reduction.weight'])
    assert torch.equal(model.stages[3].downsample.norm.bias, official['levels.2.downsample.norm.bias'])
    assert torch.equal(model.stages[1].blocks[1].attn.rpb, official['levels.1.blocks.1.attn.rpb'])
    assert torch.equal(model.stages[1].blocks[1].ls2.gamma, official['levels.1.blocks.1.gamma2'])
    assert torch.equal(model.head.fc.weight, official['head.weight'])


@pytest.mark.parametrize('name', sorted(NAT_OFFICIAL_ARCH))
def test_official_layout_of_every_variant_converts(name):
    assert_official_layout_converts(name, meta_model(name), checkpoint_filter_fn)


def test_own_state_dict_passes_through_and_mismatch_raises():
    model = NAT(**TINY_ARGS)
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model).keys() == own.keys()

    official = nat_official_state_dict(**TINY_ARGS)
    del official['levels.1.blocks.0.attn.rpb']
    official['levels.1.blocks.0.attn.relative_bias'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r'stages\.1\.blocks\.0\.attn\.rpb.*relative_bias'):
        checkpoint_filter_fn(official, model)


def natten_axis_window(length, kernel_size, dilation):
    """NATTEN < 0.20 (natten_cpu_commons.h): first key and first bias column of each query on one axis."""
    half = kernel_size // 2
    starts, bias_starts = [], []
    for i in range(length):
        if i - half * dilation < 0:
            start, bias = i % dilation, kernel_size - 1 - i // dilation
        elif i + half * dilation >= length:
            full = (length // dilation) * dilation
            rest = length - full
            if i % dilation < rest:
                start = length - rest + i % dilation - 2 * half * dilation
            else:
                start = full + i % dilation - kernel_size * dilation
            bias = (length - i - 1) // dilation
        else:
            start, bias = i - half * dilation, half
        starts.append(start)
        bias_starts.append(bias)
    return starts, bias_starts


def dense_masked_attention_bias(height, width, kernel_size, dilation, rpb):
    """[heads, H*W, H*W] logit bias: the rpb entry inside each query's window, -inf outside."""
    heads = rpb.shape[0]
    bias = torch.full((heads, height, width, height, width), float('-inf'), dtype=rpb.dtype)
    row_start, row_bias = natten_axis_window(height, kernel_size, dilation)
    col_start, col_bias = natten_axis_window(width, kernel_size, dilation)
    for y in range(height):
        for x in range(width):
            for a in range(kernel_size):
                for b in range(kernel_size):
                    key_y, key_x = row_start[y] + a * dilation, col_start[x] + b * dilation
                    bias[:, y, x, key_y, key_x] = rpb[:, row_bias[y] + a, col_bias[x] + b]
    return bias.reshape(heads, height * width, height * width)


def dense_layer(layer, x):
    """The layer by hand: zero-pad to kernel*dilation, qkv, dense softmax with bias and mask, crop, proj."""
    B, H, W, C = x.shape
    heads, head_dim = layer.num_heads, C // layer.num_heads
    window = layer.kernel_size * layer.dilation
    x = F.pad(x, (0, 0, 0, max(0, window - W), 0, max(0, window - H)))
    Hp, Wp = x.shape[1:3]
    q, k, v = layer.qkv(x).reshape(B, Hp * Wp, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    logits = (q * head_dim ** -0.5) @ k.transpose(-1, -2)
    logits = logits + dense_masked_attention_bias(Hp, Wp, layer.kernel_size, layer.dilation, layer.rpb)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, Hp, Wp, C)[:, :H, :W]
    return layer.proj(out)


@pytest.mark.parametrize('height,width,kernel_size,dilation', [
    (9, 11, 3, 1),   # map larger than the window: clamped borders
    (9, 11, 3, 2),   # dilated, odd lengths: uneven interleaved groups
    (10, 13, 3, 3),
    (5, 13, 3, 2),   # rows smaller than kernel*dilation: padded and cropped
    (4, 3, 5, 1),    # both axes smaller than the kernel
    (24, 23, 11, 2),  # DiNAT-L's 11x11 window, dilated
    (12, 25, 11, 1),  # rows padded up to the 11x11 window
])
def test_attention_layer_matches_dense_masked_softmax(height, width, kernel_size, dilation):
    torch.manual_seed(0)
    layer = NeighborhoodAttention(32, num_heads=2, kernel_size=kernel_size, dilation=dilation).double()
    with torch.no_grad():
        layer.rpb.normal_()  # large biases so a wrong bias index cannot hide
        layer.qkv.bias.normal_()  # padded tokens' keys and values are this bias
    x = torch.randn(2, height, width, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_layer(layer, x), rtol=1e-9, atol=1e-9)


@pytest.fixture(scope='module')
def dinat_mini():
    torch.manual_seed(0)
    return timm.create_model('dinat_mini', num_classes=0).eval()


# the per-layer dilations of the official dinat.py (commit d334f5b), as written there; NAT: 1 everywhere
_DINAT_OFFICIAL_DILATIONS = [
    [1, 8, 1],
    [1, 4, 1, 4],
    [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2],
    [1, 1, 1, 1, 1],
]
OFFICIAL_DILATIONS = {
    'dinat_mini': [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]],
    'dinat_tiny': _DINAT_OFFICIAL_DILATIONS,
    'dinat_small': _DINAT_OFFICIAL_DILATIONS,
    'dinat_base': _DINAT_OFFICIAL_DILATIONS,
    **{name: [[1] * depth for depth in NAT_OFFICIAL_ARCH[name]['depths']]
       for name in ('nat_mini', 'nat_tiny', 'nat_small', 'nat_base')},
}


@pytest.mark.parametrize('name', sorted(OFFICIAL_DILATIONS))
def test_dilation_of_every_layer_follows_the_official_model(name):
    model = meta_model(name)
    assert [[blk.attn.dilation for blk in stage.blocks] for stage in model.stages] == OFFICIAL_DILATIONS[name]
    assert {blk.attn.kernel_size for stage in model.stages for blk in stage.blocks} == {7}


def test_dinat_small_maps_pad_like_official(dinat_mini):
    """At 64x80 every DiNAT-Mini stage is smaller than its dilated window (stage 1: 8x10 < 7*4): the
    layer must equal running it on the explicitly zero-padded map and cropping."""
    torch.manual_seed(0)
    layer = dinat_mini.stages[1].blocks[1].attn
    assert layer.dilation == 4
    x = torch.randn(1, 8, 10, 128)
    with torch.no_grad():
        padded = layer(F.pad(x, (0, 0, 0, 28 - 10, 0, 28 - 8)))[:, :8, :10]
        torch.testing.assert_close(layer(x), padded)
        features = dinat_mini.forward_intermediates(torch.randn(1, 3, 64, 80), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in features] == [(64, 16, 20), (128, 8, 10), (256, 4, 5), (512, 2, 3)]
    assert all(torch.isfinite(f).all() for f in features)


def test_bad_images_raise():
    model = NAT(**TINY_ARGS)
    with pytest.raises(ValueError, match='3-channel.*got 1 channels'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='at least 32x32'):
        model(torch.randn(1, 3, 31, 64))


# classification/dinat.py of the official repository, written out
OFFICIAL_DINAT_LARGE = {
    'dinat_large': (7, [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]),
    'dinat_large_384': (7, [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9, [1] * 5]),
    'dinat_large_384_11x11': (11, [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]),
}


@pytest.mark.parametrize('name', list(OFFICIAL_DINAT_LARGE))
def test_dinat_large_follows_official_layout(name):
    kernel_size, dilations = OFFICIAL_DINAT_LARGE[name]
    model = timm.create_model(name, device='meta')
    layers = [[blk.attn for blk in stage.blocks] for stage in model.stages]
    assert [[layer.dilation for layer in stage] for stage in layers] == dilations
    assert {layer.kernel_size for stage in layers for layer in stage} == {kernel_size}
    assert [stage[0].num_heads for stage in layers] == [6, 12, 24, 48]
    size = model.pretrained_cfg['input_size'][1]
    # every dilated window fits its map at the pretrained size: no padding at the size it was trained at
    maps = [size // 4 // 2 ** i for i in range(4)]
    assert all(kernel_size * d <= m for m, stage in zip(maps, dilations) for d in stage)


@pytest.mark.skipif(not attnzoo.kernels._dispatch.triton_interpreted() and not torch.cuda.is_available(),
                    reason='the Triton path needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)')
@pytest.mark.parametrize('height, width, kernel_size, dilation, na_kernel', [
    (9, 11, 3, 2, 'v1'),    # dilated, uneven groups
    (9, 11, 3, 2, 'v2'),
    (8, 13, 11, 1, 'v1'),   # DiNAT-L's window; rows padded up to it
    # v2 in the interpreter takes several times v1's time
    pytest.param(8, 13, 11, 1, 'v2', marks=pytest.mark.slow),
])
def test_block_on_the_triton_path_trains_like_the_reference(height, width, kernel_size, dilation, na_kernel):
    """A NAT block with the fused kernels (rpb a trained parameter, q / k / v strided views of the qkv
    projection), on each version of the Triton kernels, gives the output and every parameter gradient of
    the same block on the reference."""
    torch.manual_seed(0)
    block = NATBlock(32, num_heads=2, kernel_size=kernel_size, dilation=dilation, layer_scale=0.5)
    with torch.no_grad():
        block.attn.rpb.normal_()
        block.attn.qkv.bias.normal_()
    reference = copy.deepcopy(block).double()
    x = torch.randn(2, height, width, 32)
    with attnzoo.kernels.use_backend('triton'), attnzoo.kernels.use_na_kernel(na_kernel):
        out = block(x)
    with attnzoo.kernels.use_backend('reference'):
        expected = reference(x.double())
    grad_out = torch.randn(out.shape)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    for (name, p), p64 in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f'{n}: {m}')
