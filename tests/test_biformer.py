"""BiFormer specifics: bi-level routing attention against a token-by-token reference, the fused and
reference routing paths through the whole model, any input size, official checkpoint conversion and
loading, and the OpenMMLab configs under configs/biformer/.

The generic timm API and the parameter counts are covered by the conformance suite (tests/test_models.py).
"""
import argparse
import importlib
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo.backbones  # noqa: F401  (registers the biformer_* models)
from attnzoo.backbones.biformer import BiFormer, BiLevelRoutingAttention, GlobalAttention, checkpoint_filter_fn
from attnzoo.kernels._dispatch import triton_interpreted
from mm_stack import needs_mm

# a small BiFormer: head_dim 16 (the smallest the Triton kernels tile), 2x2 regions at stage 3 of a 64 px image
TINY_ARCH = dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(2, 4, 6, 8), n_win=4)
OFFICIAL_FILE_NAMES = {'biformer_tiny': 'biformer_tiny_in1k.pth', 'biformer_small': 'biformer_small_in1k.pth',
                       'biformer_base': 'biformer_base_in1k.pth'}


def tiny_biformer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model('biformer_tiny', **dict(TINY_ARCH, **kwargs)).eval()


def randomize(module, seed=0):
    """Every float parameter and buffer random (BN variances positive): zero biases would hide padding bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
                tensor.copy_(values.abs() + 0.5 if name.endswith('running_var') else values)
    return module


# ---------------------------------------------------------------- attention semantics

def token_by_token_routing_attention(x, attn):
    """BiFormer's legacy BRA for one image ``x [H, W, C]``, written out token by token.

    Zero-pad at the bottom / right to a multiple of the grid, project, route every region to the
    ``topk`` regions with the largest ``(mean q) . (mean k) * C ** -0.5`` (all channels), let every
    token attend per head to all tokens of its routed regions with the full-width scale
    ``C ** -0.5``, add the 5x5 depthwise conv of the values, crop, project out.
    """
    H, W, C = x.shape
    p_h, p_w = attn.regions
    region_h, region_w = math.ceil(H / p_h), math.ceil(W / p_w)
    canvas = x.new_zeros(region_h * p_h, region_w * p_w, C)
    canvas[:H, :W] = x
    q, k, v = F.linear(canvas, attn.qkv.weight, attn.qkv.bias).split(C, dim=-1)
    scale = C ** -0.5
    regions = [[(y, x_) for y in range(ry * region_h, (ry + 1) * region_h)
                for x_ in range(rx * region_w, (rx + 1) * region_w)] for ry in range(p_h) for rx in range(p_w)]
    q_mean = torch.stack([torch.stack([q[t] for t in tokens]).mean(0) for tokens in regions])
    k_mean = torch.stack([torch.stack([k[t] for t in tokens]).mean(0) for tokens in regions])
    routed = ((q_mean * scale) @ k_mean.T).topk(attn.topk, dim=-1).indices
    heads, head_dim = attn.num_heads, C // attn.num_heads
    out = torch.zeros_like(canvas)
    for r, tokens in enumerate(regions):
        keys = [t for s in routed[r].tolist() for t in regions[s]]
        k_sel, v_sel = torch.stack([k[t] for t in keys]), torch.stack([v[t] for t in keys])
        for t in tokens:
            for h in range(heads):
                ch = slice(h * head_dim, (h + 1) * head_dim)
                weights = ((q[t][ch] @ k_sel[:, ch].T) * scale).softmax(0)
                out[t][ch] = weights @ v_sel[:, ch]
    lepe = F.conv2d(v.permute(2, 0, 1)[None], attn.lepe.weight, attn.lepe.bias, padding=2, groups=C)[0]
    out = out + lepe.permute(1, 2, 0)
    return F.linear(out[:H, :W], attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize('n_win, topk, H, W', [
    (2, 2, 4, 6),        # divisible: no padding, 2x3-token regions
    (3, 2, 5, 7),        # pads to 6 x 9
    ((2, 3), 4, 3, 8),   # a non-square grid; pads to 4 x 9
    (3, 9, 4, 4),        # every region routed: full attention over the padded map
])
def test_routing_attention_matches_token_by_token_reference(n_win, topk, H, W):
    torch.manual_seed(0)
    attn = randomize(BiLevelRoutingAttention(8, num_heads=2, n_win=n_win, topk=topk)).double().eval()
    x = torch.randn(2, H, W, 8, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
    assert out.shape == x.shape
    for b in range(2):
        torch.testing.assert_close(out[b], token_by_token_routing_attention(x[b], attn), rtol=1e-10, atol=1e-10)


def test_routing_attention_pads_before_the_projection_and_crops():
    """A 5x7 map gives what the same map zero-padded to 6x9 by hand gives, cropped back."""
    torch.manual_seed(0)
    attn = randomize(BiLevelRoutingAttention(8, num_heads=2, n_win=3, topk=2)).eval()
    x = torch.randn(1, 5, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn(F.pad(x, (0, 0, 0, 2, 0, 1)))[:, :5, :7], rtol=0, atol=1e-6)


@pytest.mark.parametrize('fused', [True, False])
def test_global_attention_is_multi_head_softmax_plus_lepe_on_the_input(fused):
    torch.manual_seed(0)
    dim, heads, H, W = 16, 8, 3, 5
    attn = randomize(GlobalAttention(dim, heads)).double().eval()
    attn.fused_attn = fused
    x = torch.randn(2, H, W, dim, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
        q, k, v = F.linear(x, attn.qkv.weight).reshape(2, H * W, 3, heads, dim // heads).unbind(2)
        weights = (torch.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(dim // heads)).softmax(-1)
        expected = torch.einsum('bhqk,bkhd->bqhd', weights, v).reshape(2, H, W, dim)
        expected = expected + F.conv2d(x.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias, padding=2,
                                       groups=dim).permute(0, 2, 3, 1)
        expected = F.linear(expected, attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_official_layer_layout():
    """The quirks the released checkpoints depend on."""
    with torch.device('meta'):
        model = timm.create_model('biformer_base')
    bra, last = model.stages[0].blocks[0].attn, model.stages[3].blocks[0].attn
    assert isinstance(bra, BiLevelRoutingAttention) and (bra.num_heads, bra.topk, bra.regions) == (3, 1, (7, 7))
    assert bra.scale == 96 ** -0.5  # the full width, not the head's
    assert [s.blocks[0].attn.topk for s in model.stages[:3]] == [1, 4, 16]
    assert isinstance(last, GlobalAttention) and last.num_heads == 8 and last.qkv.bias is None
    assert bra.lepe.kernel_size == (5, 5) and model.stages[1].blocks[0].pos_embed.kernel_size == (3, 3)
    assert model.stages[2].blocks[0].norm1.eps == 1e-6
    assert isinstance(model.norm.bn, torch.nn.BatchNorm2d)


# ---------------------------------------------------------------- fused kernel through the model

needs_interpreter = pytest.mark.skipif(
    not triton_interpreted(), reason='Triton kernels on CPU need TRITON_INTERPRET=1 (tests/conftest.py sets it)')


def fused_and_reference_results(size, batch, **arch):
    """Logits and parameter gradients of one model, run once per routing backend. The qkv weights are
    scaled up so that the routed softmax is peaked (at init it is nearly uniform and hides errors)."""
    model = tiny_biformer(num_classes=10, **arch)
    routing = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for attn in routing:
            weight = attn.qkv.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 2 / weight.shape[1] ** .5)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    results = []
    for backend in ('triton', 'reference'):
        for attn in routing:
            attn.attn_backend = backend
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        results.append((logits, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


def assert_same_logits_and_gradients(results):
    (fused, fused_grads), (reference, reference_grads) = results
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-4, msg=lambda m: f'{name}: {m}')


@needs_interpreter
def test_fused_and_reference_routing_give_the_same_model():
    """The whole model on the Triton kernels (interpreted on CPU) and on the reference: same logits and
    parameter gradients in fp32. 40 x 56 pads every routing stage (10 x 14, 5 x 7, 3 x 4 maps; n_win 4);
    one block per stage, one 16-channel head in stage 1, to keep the interpreter's time in CI's budget."""
    assert_same_logits_and_gradients(fused_and_reference_results(
        (40, 56), batch=1, embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1)))


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize('size', [(64, 64), (72, 56)])
def test_fused_and_reference_routing_give_the_same_model_thorough(size):
    """As above with two blocks in stage 3, a batch of two, an unpadded and a padded size (minutes on CPU)."""
    assert_same_logits_and_gradients(fused_and_reference_results(size, batch=2))


def test_attn_backend_reaches_every_routing_layer():
    with torch.device('meta'):
        model = timm.create_model('biformer_tiny', attn_backend='reference')
    routing = [m for m in model.modules() if isinstance(m, BiLevelRoutingAttention)]
    assert len(routing) == 12 and all(m.attn_backend == 'reference' for m in routing)
    with pytest.raises(ValueError, match='unknown backend'):
        tiny_biformer(attn_backend='cuda')(torch.randn(1, 3, 64, 64))


def test_forward_on_the_meta_device():
    """Shapes only, as tools/benchmark.py counts FLOPs: the routing op's index check has no values to read."""
    with torch.device('meta'):
        model = timm.create_model('biformer_tiny', **TINY_ARCH)
        assert model(torch.randn(2, 3, 72, 56)).shape == (2, 1000)


# ---------------------------------------------------------------- any input size, n_win

def _conv_out(size):
    return (size - 1) // 2 + 1  # 3x3, stride 2, padding 1


@pytest.mark.parametrize('size', [(97, 75), (33, 161)])
def test_features_at_odd_sizes(size):
    model = timm.create_model('biformer_tiny', features_only=True, **TINY_ARCH).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    h, w = size
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for i, feature in enumerate(features):
        h, w = _conv_out(h), _conv_out(w)
        if i == 0:
            h, w = _conv_out(h), _conv_out(w)
        assert feature.shape == (1, TINY_ARCH['embed_dims'][i], h, w)
        assert torch.isfinite(feature).all()


def test_n_win_is_a_model_kwarg_that_owns_no_parameters():
    classification = tiny_biformer()
    detection = tiny_biformer(n_win=16, seed=1)
    detection.load_state_dict(classification.state_dict())
    assert {m.regions for m in detection.modules() if isinstance(m, BiLevelRoutingAttention)} == {(16, 16)}
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        assert not torch.allclose(detection(x), classification(x))  # other regions, other routing
    grid = tiny_biformer(n_win=(2, 3), topks=(1, 2, 4, None))  # 6 regions
    assert grid.stages[0].blocks[0].attn.regions == (2, 3)
    with torch.no_grad():
        assert torch.isfinite(grid(x)).all()


@pytest.mark.parametrize('kwargs, match', [
    (dict(n_win=3), r'topk 16 routed regions, but n_win 3 gives 9 regions'),
    (dict(n_win=0), 'n_win must be an int >= 1'),
    (dict(n_win=(2, 3, 4)), 'n_win must be an int >= 1'),
    (dict(n_win=True), 'n_win must be an int >= 1'),
    (dict(topks=(1, 4, 16)), 'one entry per stage'),
    (dict(num_heads=(2, 4, 8, 7)), 'not divisible by num_heads'),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('biformer_tiny', **kwargs)


# ---------------------------------------------------------------- official checkpoints

def official_state_dict(embed_dims, depths, mlp_ratio=3, num_classes=1000, in_chans=3):
    """Random tensors under the key names and shapes of the official models/biformer.py (legacy BRA)."""
    shapes = {}

    def batch_norm(prefix, dim):
        shapes.update({prefix + 'weight': (dim,), prefix + 'bias': (dim,), prefix + 'running_mean': (dim,),
                       prefix + 'running_var': (dim,), prefix + 'num_batches_tracked': ()})

    shapes.update({'downsample_layers.0.0.weight': (embed_dims[0] // 2, in_chans, 3, 3),
                   'downsample_layers.0.0.bias': (embed_dims[0] // 2,)})
    batch_norm('downsample_layers.0.1.', embed_dims[0] // 2)
    shapes.update({'downsample_layers.0.3.weight': (embed_dims[0], embed_dims[0] // 2, 3, 3),
                   'downsample_layers.0.3.bias': (embed_dims[0],)})
    batch_norm('downsample_layers.0.4.', embed_dims[0])
    for i in range(1, 4):
        shapes.update({f'downsample_layers.{i}.0.weight': (embed_dims[i], embed_dims[i - 1], 3, 3),
                       f'downsample_layers.{i}.0.bias': (embed_dims[i],)})
        batch_norm(f'downsample_layers.{i}.1.', embed_dims[i])
    for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
        hidden = mlp_ratio * dim
        for j in range(depth):
            p = f'stages.{i}.{j}.'
            shapes.update({
                p + 'pos_embed.weight': (dim, 1, 3, 3), p + 'pos_embed.bias': (dim,),
                p + 'norm1.weight': (dim,), p + 'norm1.bias': (dim,),
                p + 'attn.lepe.weight': (dim, 1, 5, 5), p + 'attn.lepe.bias': (dim,),
                p + 'norm2.weight': (dim,), p + 'norm2.bias': (dim,),
                p + 'mlp.0.weight': (hidden, dim), p + 'mlp.0.bias': (hidden,),
                p + 'mlp.3.weight': (dim, hidden), p + 'mlp.3.bias': (dim,),
            })
            if i < 3:  # BiLevelRoutingAttention: QKVLinear (with bias) and wo
                shapes.update({p + 'attn.qkv.qkv.weight': (3 * dim, dim), p + 'attn.qkv.qkv.bias': (3 * dim,),
                               p + 'attn.wo.weight': (dim, dim), p + 'attn.wo.bias': (dim,)})
            else:  # AttentionLePE: qkv without bias, proj
                shapes.update({p + 'attn.qkv.weight': (3 * dim, dim),
                               p + 'attn.proj.weight': (dim, dim), p + 'attn.proj.bias': (dim,)})
    batch_norm('norm.', embed_dims[3])
    shapes.update({'head.weight': (num_classes, embed_dims[3]), 'head.bias': (num_classes,)})
    generator = torch.Generator().manual_seed(0)
    return {key: (torch.tensor(300) if key.endswith('num_batches_tracked')
                  else torch.randn(shape, generator=generator).abs() + 0.5 if key.endswith('running_var')
                  else torch.randn(shape, generator=generator))
            for key, shape in shapes.items()}


# official key -> ours, for a few keys of every kind
KEY_SAMPLES = {
    'downsample_layers.0.0.weight': 'stem.conv1.weight',
    'downsample_layers.0.1.running_mean': 'stem.norm1.running_mean',
    'downsample_layers.0.3.bias': 'stem.conv2.bias',
    'downsample_layers.0.4.running_var': 'stem.norm2.running_var',
    'downsample_layers.2.0.weight': 'stages.2.downsample.conv.weight',
    'downsample_layers.3.1.weight': 'stages.3.downsample.norm.weight',
    'stages.0.0.pos_embed.weight': 'stages.0.blocks.0.pos_embed.weight',
    'stages.0.1.attn.qkv.qkv.weight': 'stages.0.blocks.1.attn.qkv.weight',
    'stages.2.7.attn.qkv.qkv.bias': 'stages.2.blocks.7.attn.qkv.bias',
    'stages.1.0.attn.wo.weight': 'stages.1.blocks.0.attn.proj.weight',
    'stages.2.3.attn.lepe.weight': 'stages.2.blocks.3.attn.lepe.weight',
    'stages.2.3.mlp.0.weight': 'stages.2.blocks.3.mlp.fc1.weight',
    'stages.1.1.mlp.3.bias': 'stages.1.blocks.1.mlp.fc2.bias',
    'stages.3.0.attn.qkv.weight': 'stages.3.blocks.0.attn.qkv.weight',
    'stages.3.1.attn.proj.bias': 'stages.3.blocks.1.attn.proj.bias',
    'stages.3.1.attn.lepe.bias': 'stages.3.blocks.1.attn.lepe.bias',
    'stages.3.1.norm2.weight': 'stages.3.blocks.1.norm2.weight',
    'norm.running_var': 'norm.bn.running_var',
    'head.weight': 'head.fc.weight',
}


@pytest.fixture(scope='module')
def biformer_tiny():
    return timm.create_model('biformer_tiny')


@pytest.fixture(scope='module')
def official_tiny():
    return official_state_dict((64, 128, 256, 512), (2, 2, 8, 2))


@pytest.mark.parametrize('wrap', ['plain', 'model', 'ema_and_model', 'module_prefix'])
def test_official_checkpoint_converts_and_loads_strictly(biformer_tiny, official_tiny, wrap):
    assert len(official_tiny) == 264  # the official BiFormer-T state dict, BN buffers included
    if wrap == 'plain':
        checkpoint = official_tiny
    elif wrap == 'ema_and_model':  # the official load_release's choice: 'model' (tests/test_weights_rule.py)
        checkpoint = {'model': official_tiny, 'model_ema': {k: v - 1 for k, v in official_tiny.items()}, 'epoch': 299}
    elif wrap == 'module_prefix':
        checkpoint = {'model': {'module.' + k: v for k, v in official_tiny.items()}}
    else:
        checkpoint = {'model': official_tiny}
    converted = checkpoint_filter_fn(checkpoint, biformer_tiny)
    assert len(converted) == 264
    biformer_tiny.load_state_dict(converted, strict=True)
    ours = biformer_tiny.state_dict()
    for official_key, our_key in KEY_SAMPLES.items():
        assert torch.equal(ours[our_key], official_tiny[official_key]), official_key


def test_own_state_dict_passes_through_unchanged():
    model = tiny_biformer()
    state_dict = model.state_dict()
    converted = checkpoint_filter_fn(state_dict, model)
    assert list(converted) == list(state_dict) and all(converted[k] is state_dict[k] for k in state_dict)


def test_mismatched_checkpoint_names_the_keys():
    model = tiny_biformer()
    state_dict = official_state_dict(TINY_ARCH['embed_dims'], TINY_ARCH['depths'])
    del state_dict['stages.2.1.attn.qkv.qkv.weight']
    state_dict['stages.2.1.attn.qkv.qkv.scale'] = torch.zeros(1)
    with pytest.raises(ValueError, match=r'1 missing keys .*stages\.2\.blocks\.1\.attn\.qkv\.weight.*1 unexpected keys '
                                         r'.*stages\.2\.blocks\.1\.attn\.qkv\.scale'):
        checkpoint_filter_fn(state_dict, model)


def save_official_file(path, state_dict):
    """As the official training script (DeiT's main.py) writes it, training arguments included."""
    torch.save({'model': state_dict, 'model_ema': {k: v + 1 for k, v in state_dict.items()}, 'epoch': 299,
                'args': argparse.Namespace(model='biformer_tiny', lr=5e-4, input_size=224)}, path)


def test_pretrained_download_is_cached_under_the_official_file_name(tmp_path, monkeypatch):
    """pretrained=True: the release file is cached under the official loader's name (the three OneDrive
    links all end in '/content'), so a file put there by hand loads offline; it is read without
    unpickling anything but the training arguments, and of 'model' / 'model_ema' 'model' is taken."""
    official = official_state_dict(TINY_ARCH['embed_dims'], TINY_ARCH['depths'])
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    downloads = []

    def download_url_to_file(url, dst, hash_prefix=None, progress=True):  # the network, simulated
        downloads.append((url, dst))
        save_official_file(dst, official)
    monkeypatch.setattr(timm.models._hub, 'download_url_to_file', download_url_to_file)
    model = timm.create_model('biformer_tiny', pretrained=True, **TINY_ARCH)
    assert downloads == [(timm.models.get_pretrained_cfg('biformer_tiny').url[0],
                          str(tmp_path / 'hub' / 'checkpoints' / 'biformer_tiny_in1k.pth'))]
    assert torch.equal(model.stages[2].blocks[1].attn.qkv.weight, official['stages.2.1.attn.qkv.qkv.weight'])
    assert torch.equal(model.head.fc.weight, official['head.weight'])

    # cached: no second download; a new head: timm's own loading drops the official classifier
    model = timm.create_model('biformer_tiny', pretrained=True, num_classes=7, **TINY_ARCH)
    assert len(downloads) == 1
    assert model.head.fc.weight.shape == (7, 128)
    assert torch.equal(model.stem.conv1.weight, official['downsample_layers.0.0.weight'])


def test_load_pretrained_refuses_other_pickled_objects(tmp_path):
    path = tmp_path / 'not_weights.pth'
    torch.save({'model': {}, 'hook': print}, path)
    with pytest.raises(Exception, match='weights_only|Unsupported global'):
        tiny_biformer().load_pretrained(str(path))


def test_official_file_through_timm_file_loader(tmp_path):
    """pretrained_cfg_overlay=dict(file=...): timm's own file loader and the filter (a file of weights only)."""
    official = official_state_dict(TINY_ARCH['embed_dims'], TINY_ARCH['depths'])
    path = tmp_path / 'biformer_tiny_in1k.pth'
    torch.save({'model': official}, path)
    model = timm.create_model('biformer_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **TINY_ARCH)
    assert torch.equal(model.stages[3].blocks[0].attn.lepe.weight, official['stages.3.0.attn.lepe.weight'])


def test_pretrained_cfgs_point_at_official_release():
    for name, file_name in OFFICIAL_FILE_NAMES.items():
        cfg = timm.models.get_pretrained_cfg(name)
        url, cached_as = cfg.url
        assert url.startswith('https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvCh') and url.endswith('/root/content')
        assert cached_as == file_name and cfg.custom_load
        assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == 'bicubic'
        assert cfg.num_classes == 1000 and cfg.license == 'mit'
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    assert len({timm.models.get_pretrained_cfg(n).url[0] for n in OFFICIAL_FILE_NAMES}) == 3


# ---------------------------------------------------------------- OpenMMLab configs

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs' / 'biformer'
CONFIG_NAMES = {
    'mask-rcnn_biformer-s_fpn_1x_coco.py': ('biformer_small', 16, 0.2),
    'mask-rcnn_biformer-b_fpn_1x_coco.py': ('biformer_base', 16, 0.3),
    'retinanet_biformer-s_fpn_1x_coco.py': ('biformer_small', 16, 0.2),
    'retinanet_biformer-b_fpn_1x_coco.py': ('biformer_base', 16, 0.3),
    'upernet_biformer-s_8xb2-160k_ade20k-512x512.py': ('biformer_small', 8, 0.3),
    'upernet_biformer-b_8xb2-160k_ade20k-512x512.py': ('biformer_base', 8, 0.4),
    'fpn_biformer-s_8xb4-80k_ade20k-512x512.py': ('biformer_small', 8, 0.15),
    'fpn_biformer-b_8xb4-80k_ade20k-512x512.py': ('biformer_base', 8, 0.3),
}


def test_config_set_is_complete():
    assert sorted(p.name for p in CONFIG_DIR.glob('*.py')) == sorted(CONFIG_NAMES)


@pytest.mark.mm
@needs_mm
class TestConfigs:
    SHALLOW = dict(depths=(1, 1, 1, 1))  # BiFormer-S widths and heads, one block per stage
    DET_SIZE, SEG_SIZE = (96, 128), (64, 64)

    @staticmethod
    def load(name, shallow=False):
        from mmengine.config import Config
        cfg = Config.fromfile(str(CONFIG_DIR / name))
        cfg.model.backbone.pretrained = False  # no downloads in tests
        if shallow:
            cfg.model.backbone.update(TestConfigs.SHALLOW)
        return cfg

    @staticmethod
    def build(cfg):
        import attnzoo.heads  # noqa: F401  (registers AttnzooBackbone)
        from mmengine.registry import DefaultScope
        registry = {'mmdet': 'mmdet.registry', 'mmseg': 'mmseg.registry'}[cfg.default_scope]
        with DefaultScope.overwrite_default_scope(cfg.default_scope):
            return importlib.import_module(registry).MODELS.build(cfg.model)

    @pytest.mark.parametrize('name', sorted(CONFIG_NAMES))
    def test_backbone_follows_the_official_dense_backbone(self, name):
        model_name, n_win, drop_path_rate = CONFIG_NAMES[name]
        cfg = self.load(name)
        backbone = cfg.model.backbone
        assert (backbone.type, backbone.model_name, backbone.n_win) == ('AttnzooBackbone', model_name, n_win)
        assert backbone.drop_path_rate == drop_path_rate
        assert backbone.out_norm  # BiFormer_mm's extra LayerNorm2d per output
        built = self.build(cfg).backbone
        assert built.norm_eval == name.startswith(('mask-rcnn', 'retinanet'))  # BiFormer_mm (det) freezes BN stats
        assert len(built.out_norms) == len(built.out_indices)
        attn = built.features.model.stages[0].blocks[0].attn
        assert attn.regions == (n_win, n_win)

    @pytest.mark.parametrize('prefix', ['mask-rcnn', 'retinanet'])
    def test_detector_loss_backward_predict(self, prefix):
        from mmdet.structures import DetDataSample
        from mmdet.structures.mask import BitmapMasks
        from mmengine.structures import InstanceData
        import numpy as np
        torch.manual_seed(0)
        cfg = self.load(f'{prefix}_biformer-s_fpn_1x_coco.py', shallow=True)
        with_masks = prefix == 'mask-rcnn'
        if with_masks:  # an untrained box head scores everything below 0.05: keep the top ten for the mask head
            cfg.model.test_cfg.rcnn.update(score_thr=0., max_per_img=10)
        model = self.build(cfg).train()
        h, w = self.DET_SIZE
        generator = torch.Generator().manual_seed(0)
        inputs, samples = [], []
        for _ in range(2):
            inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator))
            sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.)))
            sample.gt_instances = InstanceData(bboxes=torch.tensor([[10., 20., 70., 90.]]), labels=torch.tensor([3]))
            if with_masks:
                mask = np.zeros((1, h, w), dtype=np.uint8)
                mask[0, 20:90, 10:70] = 1
                sample.gt_instances.masks = BitmapMasks(mask, h, w)
            samples.append(sample)
        data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
        grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
        assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
        model.eval()
        with torch.no_grad():
            results = model(**model.data_preprocessor(dict(inputs=inputs, data_samples=samples)), mode='predict')
        assert len(results) == 2 and all(torch.isfinite(r.pred_instances.bboxes).all() for r in results)

    @pytest.mark.parametrize('prefix', ['upernet', 'fpn'])
    def test_segmentor_loss_backward_predict(self, prefix):
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        torch.manual_seed(0)
        name = next(n for n in CONFIG_NAMES if n.startswith(f'{prefix}_biformer-s'))
        cfg = self.load(name, shallow=True)
        cfg.model.data_preprocessor.size = self.SEG_SIZE  # the configs pad to the 512x512 training crop
        model = self.build(cfg).train()
        h, w = self.SEG_SIZE
        generator = torch.Generator().manual_seed(0)
        inputs, samples = [], []
        for _ in range(2):
            inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator))
            sample = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w)))
            sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, h, w), generator=generator))
            samples.append(sample)
        data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training=True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
        assert torch.isfinite(loss)
        model.eval()
        with torch.no_grad():
            results = model(**model.data_preprocessor(dict(inputs=inputs, data_samples=samples)), mode='predict')
        assert [tuple(r.pred_sem_seg.data.shape) for r in results] == [(1, h, w)] * 2
