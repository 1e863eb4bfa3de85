"""NAT / DiNAT specifics: official checkpoint keys, the attention layer against a dense masked softmax
with NATTEN's window and bias rule, and DiNAT's dilated layers on maps smaller than the dilated window.

The generic timm API and the parameter counts are covered by the conformance suite.
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo.backbones  # noqa: F401  (registers the models)
import attnzoo.kernels
from attnzoo.backbones.nat import NAT, NATBlock, NeighborhoodAttention, checkpoint_filter_fn

# a small NAT with LayerScale (head_dim 16, the smallest the op takes)
TINY_ARGS = dict(embed_dim=32, depths=(1, 2, 1, 1), num_heads=(2, 4, 8, 16), mlp_ratio=2., kernel_size=3,
                 layer_scale=1e-5, num_classes=10)


def official_state_dict(embed_dim, depths, num_heads, mlp_ratio, kernel_size, layer_scale, num_classes,
                        in_chans=3):
    """Random tensors under the key names and shapes of the official classification/nat.py."""
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
    generator = torch.Generator().manual_seed(0)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


@pytest.mark.parametrize('wrap', ['plain', 'model', 'state_dict_module'])
def test_official_checkpoint_converts_and_loads_strictly(wrap):
    official = official_state_dict(**TINY_ARGS)
    checkpoint = {
        'plain': official,
        'model': {'model': official},
        'state_dict_module': {'state_dict': {'module.' + k: v for k, v in official.items()}},
    }[wrap]
    model = NAT(**TINY_ARGS)
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)

    # the official downsample closes level i, ours opens stage i + 1
    assert torch.equal(model.stem.conv2.weight, official['patch_embed.proj.1.weight'])
    assert torch.equal(model.stages[1].downsample.conv.weight, official['levels.0.downsample.reduction.weight'])
    assert torch.equal(model.stages[3].downsample.norm.bias, official['levels.2.downsample.norm.bias'])
    assert torch.equal(model.stages[1].blocks[1].attn.rpb, official['levels.1.blocks.1.attn.rpb'])
    assert torch.equal(model.stages[1].blocks[1].ls2.gamma, official['levels.1.blocks.1.gamma2'])
    assert torch.equal(model.head.fc.weight, official['head.weight'])


def test_official_nat_mini_layout_converts():
    """The real NAT-Mini key set (253 tensors, no LayerScale) maps onto nat_mini."""
    args = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3., kernel_size=7,
                layer_scale=None, num_classes=1000)
    official = official_state_dict(**args)
    assert len(official) == 253
    model = timm.create_model('nat_mini')
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)


def test_own_state_dict_passes_through_and_mismatch_raises():
    model = NAT(**TINY_ARGS)
    own = model.state_dict()
    assert checkpoint_filter_fn(own, model).keys() == own.keys()

    official = official_state_dict(**TINY_ARGS)
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


def test_dinat_dilations_follow_official_layout(dinat_mini):
    dilations = [[blk.attn.dilation for blk in stage.blocks] for stage in dinat_mini.stages]
    assert dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2], [1, 1, 1, 1, 1]]
    nat_mini = timm.create_model('nat_mini', device='meta')
    assert {blk.attn.dilation for stage in nat_mini.stages for blk in stage.blocks} == {1}


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
@pytest.mark.parametrize('height, width, kernel_size, dilation', [
    (9, 11, 3, 2),    # dilated, uneven groups
    (8, 13, 11, 1),   # DiNAT-L's window; rows padded up to it
])
def test_block_on_the_triton_path_trains_like_the_reference(height, width, kernel_size, dilation):
    """A NAT block with the fused kernels (rpb a trained parameter, q / k / v strided views of the qkv
    projection) gives the output and every parameter gradient of the same block on the reference."""
    torch.manual_seed(0)
    block = NATBlock(32, num_heads=2, kernel_size=kernel_size, dilation=dilation, layer_scale=0.5)
    with torch.no_grad():
        block.attn.rpb.normal_()
        block.attn.qkv.bias.normal_()
    reference = copy.deepcopy(block).double()
    x = torch.randn(2, height, width, 32)
    with attnzoo.kernels.use_backend('triton'):
        out = block(x)
    with attnzoo.kernels.use_backend('reference'):
        expected = reference(x.double())
    grad_out = torch.randn(out.shape)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    for (name, p), p64 in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.double(), p64.grad, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f'{n}: {m}')
