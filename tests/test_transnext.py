"""TransNeXt: what the generic conformance suite (tests/test_models.py) does not check.

The official code (DaiShiResearch/TransNeXt, ``classification/transnext.py``,
``classification/attention_native.py``, ``detection/maskrcnn/transnext_native.py``) defines what is
checked here: its CPB coordinate table, its window mask and length scale, its checkpoint layout (key
names and shapes written from that code; key counts from instantiating it), and aggregated attention
itself, against a per-query loop written from the paper's definition. The end-to-end comparison with
the official code (same weights, fp32, 224 px and non-square sizes through the dense path) needs the
official repository and is recorded in model_cards/transnext.md.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import attnzoo.backbones  # noqa: F401  (registers the models)
from attnzoo.kernels import get_na_kernel, use_backend, use_na_kernel
from attnzoo.kernels._dispatch import triton_interpreted
from attnzoo.backbones.transnext import (
    AggregatedAttention, Attention, checkpoint_filter_fn, local_window_context, relative_position_cpb, shape_cpb_bias)
from reference_params import OFFICIAL_PARAMS

# len(official_model.state_dict()) (commit c8a9974, classification/transnext.py, 1000-class head)
OFFICIAL_KEY_COUNTS = {
    'transnext_micro': 617, 'transnext_tiny': 617, 'transnext_small': 1054, 'transnext_base': 1083,
    'transnext_small_384': 1054, 'transnext_base_384': 1083, 'transnext_micro_aaaa_256': 635,
}
# the official constructors' arguments (classification/transnext.py)
_MICRO = dict(embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2))
_SMALL = dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5))
_BASE = dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5))
OFFICIAL_ARCH = {
    'transnext_micro': _MICRO,
    'transnext_tiny': dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(2, 2, 15, 2)),
    'transnext_small': _SMALL,
    'transnext_base': _BASE,
    'transnext_small_384': _SMALL,
    'transnext_base_384': _BASE,
    'transnext_micro_aaaa_256': dict(_MICRO, aggregated_stages=4),
}


def official_state_dict(embed_dims, num_heads, depths, aggregated_stages=3, mlp_ratios=(8, 8, 4, 4),
                        num_classes=1000, device='meta'):
    """Named and shaped like the official classification ``TransNeXt`` (window 3: 9 local positions)."""
    shapes = {}
    for i, (dim, heads, depth) in enumerate(zip(embed_dims, num_heads, depths), start=1):
        in_dim, kernel = (3, 7) if i == 1 else (embed_dims[i - 2], 3)
        shapes.update({f'patch_embed{i}.proj.weight': (dim, in_dim, kernel, kernel), f'patch_embed{i}.proj.bias': (dim,),
                       f'patch_embed{i}.norm.weight': (dim,), f'patch_embed{i}.norm.bias': (dim,)})
        hidden = int(2 * int(dim * mlp_ratios[i - 1]) / 3)
        for j in range(depth):
            p = f'block{i}.{j}.'
            attn = {'temperature': (heads, 1, 1), 'query_embedding': (heads, 1, dim // heads),
                    'cpb_fc1.weight': (512, 2), 'cpb_fc1.bias': (512,), 'cpb_fc2.weight': (heads, 512),
                    'cpb_fc2.bias': (heads,), 'proj.weight': (dim, dim), 'proj.bias': (dim,)}
            if i <= aggregated_stages:
                attn.update({'q.weight': (dim, dim), 'q.bias': (dim,), 'kv.weight': (2 * dim, dim),
                             'kv.bias': (2 * dim,), 'sr.weight': (dim, dim, 1, 1), 'sr.bias': (dim,),
                             'norm.weight': (dim,), 'norm.bias': (dim,), 'relative_pos_bias_local': (heads, 9),
                             'learnable_tokens': (heads, dim // heads, 9), 'learnable_bias': (heads, 1, 9)})
            else:
                attn.update({'qkv.weight': (3 * dim, dim), 'qkv.bias': (3 * dim,)})
            shapes.update({p + 'attn.' + k: v for k, v in attn.items()})
            shapes.update({p + 'norm1.weight': (dim,), p + 'norm1.bias': (dim,), p + 'norm2.weight': (dim,),
                           p + 'norm2.bias': (dim,), p + 'mlp.fc1.weight': (2 * hidden, dim),
                           p + 'mlp.fc1.bias': (2 * hidden,), p + 'mlp.dwconv.dwconv.weight': (hidden, 1, 3, 3),
                           p + 'mlp.dwconv.dwconv.bias': (hidden,), p + 'mlp.fc2.weight': (dim, hidden),
                           p + 'mlp.fc2.bias': (dim,)})
        shapes.update({f'norm{i}.weight': (dim,), f'norm{i}.bias': (dim,)})
    shapes.update({'head.weight': (num_classes, embed_dims[-1]), 'head.bias': (num_classes,)})
    if device == 'meta':
        return {k: torch.empty(s, device='meta') for k, s in shapes.items()}
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=generator) for k, s in shapes.items()}


def official_cpb(query_size, key_size, pretrain_size):
    """The official get_relative_position_cpb: torch.unique over every (query, key) coordinate pair."""
    axis_qh = torch.arange(query_size[0], dtype=torch.float32)
    axis_kh = F.adaptive_avg_pool1d(axis_qh.unsqueeze(0), key_size[0]).squeeze(0)
    axis_qw = torch.arange(query_size[1], dtype=torch.float32)
    axis_kw = F.adaptive_avg_pool1d(axis_qw.unsqueeze(0), key_size[1]).squeeze(0)
    axis_kh, axis_kw = [t.reshape(-1) for t in torch.meshgrid(axis_kh, axis_kw, indexing='ij')]
    axis_qh, axis_qw = [t.reshape(-1) for t in torch.meshgrid(axis_qh, axis_qw, indexing='ij')]
    relative_h = (axis_qh[:, None] - axis_kh[None, :]) / (pretrain_size[0] - 1) * 8
    relative_w = (axis_qw[:, None] - axis_kw[None, :]) / (pretrain_size[1] - 1) * 8
    table, index = torch.unique(torch.stack([relative_h, relative_w], dim=-1).view(-1, 2), return_inverse=True, dim=0)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / torch.log2(torch.tensor(8.))
    return index, table


@pytest.fixture(scope='module')
def micro():
    torch.manual_seed(0)
    return timm.create_model('transnext_micro').eval()


@pytest.mark.parametrize('query_size, key_size, pretrain_size', [
    ((56, 56), (7, 7), (56, 56)),      # stage 1 at 224
    ((7, 7), (7, 7), (7, 7)),          # stage 4 (full attention)
    ((48, 48), (12, 12), (28, 28)),    # stage 2 of the 384 models (pretrain 224)
    ((50, 83), (6, 10), (56, 56)),     # a detection-sized, non-square map
    ((29, 24), (5, 5), (28, 28)),      # fixed_pool_size 5
])
def test_cpb_table_and_index_are_the_official_ones(query_size, key_size, pretrain_size):
    index, table = relative_position_cpb(list(query_size), list(key_size), list(pretrain_size))
    official_index, official_table = official_cpb(query_size, key_size, pretrain_size)
    assert torch.equal(table, official_table)
    assert torch.equal(index, official_index)


def test_window_length_scale_counts_only_in_map_neighbours():
    """Corners see 4 of the 3x3 window, edges 6, the interior 9 (the official get_seqlen_and_mask)."""
    scale, mask = local_window_context(4, 5, 3, pool_len=6)
    assert scale.shape == (20, 1) and mask.shape == (20, 9)
    in_map = (~mask).sum(-1).view(4, 5)
    assert in_map.tolist() == [[4, 6, 6, 6, 4], [6, 9, 9, 9, 6], [6, 9, 9, 9, 6], [4, 6, 6, 6, 4]]
    torch.testing.assert_close(scale.view(4, 5), torch.log(in_map.float() + 6))
    # the top-left corner misses the top row and the left column of its window
    assert mask[0].view(3, 3).tolist() == [[True, True, True], [True, False, False], [True, False, False]]


def aggregated_attention_by_token(attn, x, pool_bias):
    """Aggregated attention of one image from its definition, one query at a time: cosine logits of
    the in-map 3x3 neighbours (+ local bias) and of the pooled tokens (+ CPB bias), one softmax, then
    the learnable tokens (unscaled normalised query) weighting the same neighbours' values."""
    _, H, W, C = x.shape
    heads, d = attn.num_heads, attn.head_dim
    tokens = x[0].reshape(H * W, C)
    q = F.normalize(attn.q(tokens).view(-1, heads, d), dim=-1)
    k, v = attn.kv(tokens).view(-1, 2, heads, d).unbind(1)
    k = F.normalize(k, dim=-1)
    pooled = F.adaptive_avg_pool2d(attn.act(attn.sr(x.permute(0, 3, 1, 2))), (H // attn.sr_ratio, W // attn.sr_ratio))
    pooled = attn.norm(pooled[0].flatten(1).t())
    k_pool, v_pool = attn.kv(pooled).view(-1, 2, heads, d).unbind(1)
    k_pool = F.normalize(k_pool, dim=-1)
    out = torch.zeros(H * W, heads, d)
    pool_len = k_pool.shape[0]
    for y in range(H):
        for x_ in range(W):
            n = y * W + x_
            neighbours = [((y + dy) * W + x_ + dx, (dy + 1) * 3 + dx + 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                          if 0 <= y + dy < H and 0 <= x_ + dx < W]
            scale = F.softplus(attn.temperature.view(heads, 1)) * math.log(len(neighbours) + pool_len)
            q_scaled = (q[n] + attn.query_embedding.view(heads, d)) * scale
            keys = torch.stack([k[m] for m, _ in neighbours], 1)                        # [heads, nb, d]
            local = (q_scaled[:, None] * keys).sum(-1) + attn.relative_pos_bias_local[:, [j for _, j in neighbours]]
            glob = (q_scaled[:, None] * k_pool.transpose(0, 1)).sum(-1) + pool_bias[:, n]
            probs = torch.cat([local, glob], -1).softmax(-1)
            tokens_weight = (q[n][:, :, None] * attn.learnable_tokens).sum(1) + attn.learnable_bias[:, 0]
            weight = probs[:, :len(neighbours)] + tokens_weight[:, [j for _, j in neighbours]]
            values = torch.stack([v[m] for m, _ in neighbours], 1)
            out[n] = (weight[..., None] * values).sum(1) + (probs[:, len(neighbours):, None] *
                                                              v_pool.transpose(0, 1)).sum(1)
    return attn.proj(out.reshape(1, H, W, C))


@pytest.mark.parametrize('attn_impl', ['fused', 'native'])
@pytest.mark.parametrize('height, width', [(5, 4), (6, 7)])
def test_aggregated_attention_matches_its_definition(height, width, attn_impl):
    torch.manual_seed(0)
    attn = AggregatedAttention(32, 2, trained_size=(height, width), trained_pool_size=(height // 2, width // 2),
                               sr_ratio=2, attn_impl=attn_impl).eval()
    with torch.no_grad():
        for p in (attn.learnable_bias, attn.relative_pos_bias_local):
            p.normal_()
    x = torch.randn(1, height, width, 32)
    index, table = relative_position_cpb([height, width], [height // 2, width // 2], [height, width])
    scale, mask = local_window_context(height, width, 3, (height // 2) * (width // 2))
    with torch.no_grad():
        pool_bias = attn.cpb_bias(index, table, [height, width], [height // 2, width // 2])
        expected = aggregated_attention_by_token(attn, x, pool_bias)
        got = attn(x, index, table, scale, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


TRITON_PATHS = {'triton': ('triton', 'v1'), 'triton_v2': ('triton', 'v2')}


@pytest.mark.parametrize('size, kwargs, path', [
    ((64, 48), {}, None),
    ((50, 70), dict(is_extrapolation=True), None),
    ((40, 32), dict(embed_dims=(24, 48, 48, 48), num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1), fixed_pool_size=2),
     'triton'),
    pytest.param((40, 32), dict(embed_dims=(24, 48, 48, 48), num_heads=(1, 2, 2, 2), depths=(1, 1, 1, 1),
                                fixed_pool_size=2), 'triton_v2', marks=pytest.mark.slow),
    pytest.param((64, 48), {}, 'triton', marks=pytest.mark.slow),
    pytest.param((50, 70), dict(is_extrapolation=True), 'triton', marks=pytest.mark.slow),
    pytest.param((64, 48), {}, 'triton_v2', marks=pytest.mark.slow),
    pytest.param((50, 70), dict(is_extrapolation=True), 'triton_v2', marks=pytest.mark.slow),
], ids=['cpu_kernels-built', 'cpu_kernels-extrapolated', 'triton-small', 'triton_v2-small', 'triton-built',
        'triton-extrapolated', 'triton_v2-built', 'triton_v2-extrapolated'])
def test_fused_path_matches_native_forward_and_gradients(size, kwargs, path):
    """The model on the extended neighborhood op equals the op-by-op official mirror (fp32, 1e-4), output
    and every parameter's gradient, at a built size and (extrapolating) at non-square other ones: on the
    op's kernels for the device (the CPU kernels here) and on the fused Triton kernels (the interpreter on
    CPU, where a narrow model keeps it fast: 2 x 2 pools, a 10 x 8 stage 1 and a 3 x 2 stage 3, smaller than
    the window); ``triton_v2`` runs the second version of the Triton kernels (ATTNZOO_NA_KERNEL=v2)."""
    backend, na_kernel = TRITON_PATHS.get(path, (path, get_na_kernel()))
    if backend == 'triton' and not (triton_interpreted() or torch.cuda.is_available()):
        pytest.skip('the Triton kernels need a GPU or TRITON_INTERPRET=1')
    torch.manual_seed(0)
    kwargs = dict(dict(img_size=64, num_classes=10, depths=(1, 1, 2, 1)), **kwargs)
    fused = timm.create_model('transnext_micro', **kwargs).train()
    native = timm.create_model('transnext_micro', attn_impl='native', **kwargs).train()
    native.load_state_dict(fused.state_dict())
    with torch.no_grad():  # non-trivial learnable tokens and local bias (zeros / ~4e-4 at init)
        for name, p in fused.named_parameters():
            if name.endswith(('learnable_bias', 'relative_pos_bias_local')):
                p.normal_()
        native.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, *size)
    outputs = []
    for model in (fused, native):
        with use_backend(backend), use_na_kernel(na_kernel):
            out = model(x)
            out.square().mean().backward()
        outputs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-4, atol=1e-4)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(grad, outputs[1][1][name], rtol=1e-4, atol=1e-4, msg=lambda m: f'{name}: {m}')


def test_full_attention_fused_and_explicit_agree():
    torch.manual_seed(0)
    attn = Attention(64, 4, trained_size=(5, 6)).eval()
    x = torch.randn(2, 5, 6, 64)
    index, table = relative_position_cpb([5, 6], [5, 6], [5, 6])
    scale = torch.log(torch.tensor(30.))
    with torch.no_grad():
        attn.fused_attn = True
        fused = attn(x, index, table, scale)
        attn.fused_attn = False
        explicit = attn(x, index, table, scale)
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


def test_cpb_bias_resize_follows_the_grid():
    """A same-size resize is a reshape; a bias that depends only on the key's row keeps that
    dependence after the bilinear resize to a new grid (the official dense code's two resizes)."""
    bias = torch.randn(3, 4 * 5 * 2 * 3)
    torch.testing.assert_close(shape_cpb_bias(bias, [4, 5], [2, 3], [4, 5], [2, 3]), bias.view(3, 20, 6))
    rows = torch.tensor([0., 1.]).view(1, 1, 2, 1).expand(3, 20, 2, 3).reshape(3, -1)
    resized = shape_cpb_bias(rows, [8, 10], [4, 3], [4, 5], [2, 3])
    assert resized.shape == (3, 80, 12)
    expected_rows = F.interpolate(torch.tensor([0., 1.]).view(1, 1, 2), 4, mode='linear', align_corners=False).view(4)
    torch.testing.assert_close(resized, expected_rows.view(1, 1, 4, 1).expand(3, 80, 4, 3).reshape(3, 80, 12))


def test_interpolated_and_extrapolated_bias_agree_only_at_the_built_size():
    """``is_extrapolation`` changes nothing at the built size and something at another one."""
    torch.manual_seed(0)
    interpolating = timm.create_model('transnext_micro', img_size=64).eval()
    with torch.no_grad():  # a trained-size CPB bias (the init's is ~1e-3)
        for name, p in interpolating.named_parameters():
            if 'cpb_fc2.weight' in name:
                p.normal_(std=0.5)
    extrapolating = timm.create_model('transnext_micro', img_size=64, is_extrapolation=True).eval()
    extrapolating.load_state_dict(interpolating.state_dict())
    x = torch.randn(1, 3, 64, 64)
    odd = torch.randn(1, 3, 96, 80)
    with torch.no_grad():
        torch.testing.assert_close(extrapolating.forward_features(x), interpolating.forward_features(x))
        a, b = extrapolating.forward_features(odd), interpolating.forward_features(odd)
    assert (a - b).abs().max() > 1e-2  # float noise is ~1e-6


def test_pool_follows_the_map_or_stays_fixed():
    seen = []
    model = timm.create_model('transnext_micro', num_classes=0, depths=(1, 1, 1, 1)).eval()
    fixed = timm.create_model('transnext_micro', num_classes=0, depths=(1, 1, 1, 1), fixed_pool_size=3).eval()
    for m in (model, fixed):
        m.stages[0].blocks[0].attn.norm.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    with torch.no_grad():
        for size in ((64, 64), (96, 80)):
            model(torch.randn(1, 3, *size))
            fixed(torch.randn(1, 3, *size))
    # stage 1 (stride 4, sr 8): 64 px -> 16 // 8 squared = 4 tokens; 96x80 -> 3 x 2 = 6; fixed: 9
    assert seen == [4, 9, 6, 9]


@pytest.mark.parametrize('size', [(97, 131), (33, 47)])
def test_features_only_on_odd_sizes(size):
    model = timm.create_model('transnext_micro', features_only=True, out_indices=(0, 1, 2, 3)).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    h, w = size
    for feature, chans, reduction in zip(features, (48, 96, 192, 384), (4, 8, 16, 32)):
        assert feature.shape == (1, chans, -(-h // reduction), -(-w // reduction))
        assert torch.isfinite(feature).all()


@pytest.mark.parametrize('name', sorted(OFFICIAL_KEY_COUNTS))
def test_official_layout_of_every_variant_converts(name):
    official = official_state_dict(**OFFICIAL_ARCH[name])
    assert len(official) == OFFICIAL_KEY_COUNTS[name]
    assert sum(v.numel() for v in official.values()) == OFFICIAL_PARAMS[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    converted = checkpoint_filter_fn(official, model)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize('wrap', [False, True])
def test_official_checkpoint_loads_strictly_and_buffers_are_rebuilt(micro, wrap):
    official = official_state_dict(**_MICRO, device='cpu')
    # a file that carries the official model's CPB buffers: they are dropped, ours stay as built
    official['relative_pos_index1'] = torch.zeros(5, dtype=torch.long)
    official['relative_coords_table1'] = torch.zeros(5, 2)
    index_before = micro.stages[0].relative_pos_index.clone()
    model = timm.create_model('transnext_micro').eval()
    model.load_state_dict(checkpoint_filter_fn({'model': official} if wrap else official, model), strict=True)
    assert torch.equal(model.stages[0].relative_pos_index, index_before)
    torch.testing.assert_close(model.stages[3].blocks[1].attn.qkv.weight, official['block4.1.attn.qkv.weight'])
    torch.testing.assert_close(model.stages[1].downsample.proj.weight, official['patch_embed2.proj.weight'])
    torch.testing.assert_close(model.stages[2].blocks[14].mlp.dwconv.weight,
                               official['block3.14.mlp.dwconv.dwconv.weight'])
    torch.testing.assert_close(model.stages[3].norm.weight, official['norm4.weight'])
    torch.testing.assert_close(model.head.fc.weight, official['head.weight'])


def test_checkpoint_of_another_variant_names_the_keys(micro):
    official = official_state_dict(**_SMALL)
    with pytest.raises(ValueError, match=r'missing keys|unexpected keys') as info:
        checkpoint_filter_fn(official, micro)
    assert 'stages.0.blocks.2' in str(info.value)


def test_meta_built_model_rebuilds_its_buffers():
    with torch.device('meta'):
        model = timm.create_model('transnext_micro')
    model = model.to_empty(device='cpu')
    model.init_non_persistent_buffers()
    index, table = official_cpb((56, 56), (7, 7), (56, 56))
    assert torch.equal(model.stages[0].relative_pos_index, index)
    assert torch.equal(model.stages[0].relative_coords_table, table)


def test_pretrained_cfgs_name_the_official_hub_files():
    expected = {
        'transnext_micro': ('DaiShiResearch/transnext-micro-224-1k', 'transnext_micro_224_1k.pth', 224),
        'transnext_tiny': ('DaiShiResearch/transnext-tiny-224-1k', 'transnext_tiny_224_1k.pth', 224),
        'transnext_small': ('DaiShiResearch/transnext-small-224-1k', 'transnext_small_224_1k.pth', 224),
        'transnext_base': ('DaiShiResearch/transnext-base-224-1k', 'transnext_base_224_1k.pth', 224),
        'transnext_small_384': ('DaiShiResearch/transnext-small-384-1k-ft-1k', 'transnext_small_384_1k_ft_1k.pth', 384),
        'transnext_base_384': ('DaiShiResearch/transnext-base-384-1k-ft-1k', 'transnext_base_384_1k_ft_1k.pth', 384),
        'transnext_micro_aaaa_256': ('DaiShiResearch/transnext-micro-AAAA-256-1k',
                                     'transnext_micro_AAAA_256_1k.pth', 256),
    }
    for name, (hub_id, filename, size) in expected.items():
        cfg = timm.get_pretrained_cfg(name)
        assert (cfg.hf_hub_id, cfg.hf_hub_filename, cfg.input_size[1]) == (hub_id, filename, size), name


@pytest.mark.parametrize('kwargs, match', [
    (dict(window_size=(4, 3, 3, None)), 'odd'),
    (dict(window_size=(3, 3, 3, 3)), 'sr_ratio'),
    (dict(img_size=32), 'too small'),
    (dict(num_heads=(2, 4, 8)), 'num_heads'),
])
def test_bad_arguments_say_what_is_wrong(kwargs, match):
    with torch.device('meta'), pytest.raises(ValueError, match=match):
        timm.create_model('transnext_micro', **kwargs)


# ----------------------------------------------------------------------------- OpenMMLab configs (configs/transnext)
#
# Every config under configs/ is built at full size by tests/test_heads.py::test_config_loads_and_builds; here
# the Tiny configs run a loss, its backward and a prediction, one block per stage at a built size of 224 px
# (the full configs build the CPB tables for 800 / 512 px).

TRANSNEXT_SHALLOW = dict(depths=(1, 1, 1, 1), img_size=224)


@pytest.fixture(scope='module')
def mm_helpers():
    for name in ('mmengine', 'mmcv', 'mmdet', 'mmseg'):
        pytest.importorskip(name)
    import test_heads
    return test_heads


def transnext_config(mm_helpers, prefix):
    cfg = mm_helpers.load_config(mm_helpers.config_path(prefix))
    assert cfg.model.backbone.pretrain_size == 224 and cfg.model.backbone.is_extrapolation is False
    cfg.model.backbone.update(TRANSNEXT_SHALLOW)
    return cfg


@pytest.mark.mm
def test_mask_rcnn_tiny_loss_backward_and_predict(mm_helpers):
    torch.manual_seed(0)
    cfg = transnext_config(mm_helpers, 'mask-rcnn_transnext-t')
    cfg.model.test_cfg.rcnn.update(score_thr=0., max_per_img=10)
    model = mm_helpers.build_model(cfg).train()
    data = model.data_preprocessor(mm_helpers.det_batch(with_masks=True), training=True)
    losses = model(**data, mode='loss')
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    mm_helpers.total_loss(model, losses).backward()
    grads = mm_helpers.backbone_grads(model)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(mm_helpers.det_batch(with_masks=False), training=False)
        mm_helpers.check_detections(model(**data, mode='predict'), with_masks=True)


@pytest.mark.mm
def test_upernet_tiny_loss_and_predict(mm_helpers):
    torch.manual_seed(0)
    cfg = transnext_config(mm_helpers, 'upernet_transnext-t')
    cfg.model.data_preprocessor.size = mm_helpers.SEG_SIZE
    cfg.model.test_cfg = dict(mode='whole')
    model = mm_helpers.build_model(cfg).train()
    data = model.data_preprocessor(mm_helpers.seg_batch(), training=True)
    losses = model(**data, mode='loss')
    mm_helpers.total_loss(model, losses).backward()
    assert all(g is not None and torch.isfinite(g).all() for g in mm_helpers.backbone_grads(model))
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(mm_helpers.seg_batch(seed=1), training=False), mode='predict')
    assert [tuple(r.pred_sem_seg.data.shape) for r in results] == [(1, *mm_helpers.SEG_SIZE)] * 2


@pytest.mark.parametrize('name, trained_at', [('transnext_micro', 224), ('transnext_micro_aaaa_256', 256)])
def test_pretrained_weights_keep_their_own_pretrain_size(tmp_path, name, trained_at):
    """img_size alone with pretrained weights does not rescale the CPB coordinates: pretrain_size is the
    size the weights were trained at (the official dense configs pass pretrain_size=224 beside img_size)."""
    small = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), img_size=288)
    path = tmp_path / 'weights.pth'
    torch.save(timm.create_model(name, **small).state_dict(), path)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **small)
    expected = timm.create_model(name, pretrain_size=trained_at, **small)
    assert [stage.pretrain_size for stage in loaded.stages] == [stage.pretrain_size for stage in expected.stages]
    assert loaded.stages[0].pretrain_size == [trained_at // 4] * 2
    for ours, reference in zip(loaded.stages, expected.stages):
        torch.testing.assert_close(ours.relative_coords_table, reference.relative_coords_table, rtol=0, atol=0)
    # without weights the official default holds: pretrain_size follows img_size
    assert timm.create_model(name, **small).stages[0].pretrain_size == [288 // 4] * 2
