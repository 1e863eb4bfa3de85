"""CrossFormer / CrossFormer++-specific tests: grouping and masking semantics against a token-by-token
reference, the architecture facts of the official code, official checkpoints of both generations, and
the OpenMMLab configs (loss / backward / predict of the smallest backbone; every config builds in
tests/test_heads.py).

The generic timm API and the parameter counts are covered by the conformance suite.
"""
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import timm
from timm.models import group_parameters

import attnzoo.backbones  # noqa: F401  (registers the crossformer_* models)
from attnzoo.backbones.crossformer import (
    ActivationCooling, LongShortDistanceAttention, checkpoint_filter_fn, group_layout)
from mm_stack import needs_mm
from official_checkpoints import (
    CHECKPOINT_WRAPS, CROSSFORMER_OFFICIAL_ARCH, CROSSFORMER_V1_KEY_COUNTS, OFFICIAL_KEY_COUNTS,
    assert_official_checkpoint_loads, assert_official_layout_converts, crossformer_official_state_dict,
    to_official_layout, wrap_as_saved)

V1_NAMES = ['crossformer_tiny', 'crossformer_small', 'crossformer_base', 'crossformer_large']
PP_NAMES = ['crossformer_pp_small', 'crossformer_pp_base', 'crossformer_pp_large', 'crossformer_pp_huge']
# small widths, all four stages, an LDA block in each, and (++) one activation cooling layer in stage 3
TINY_ARCH = dict(embed_dim=32, depths=(2, 2, 4, 2), num_heads=(1, 2, 2, 4))


def meta_model(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


# ---------------------------------------------------------------- attention semantics

def reference_group_attention(attn, x, group_size, interval):
    """Dense reference of one block's attention on one image: x [H, W, C] -> [H, W, C].

    Written from the official rules, not from the module's reshapes: with ``S = group_size * interval``,
    token (r, c) belongs to region (r // S, c // S) and offset (r % interval, c % interval); tokens with
    the same region and offset form a group, in which the token sits at ((r % S) // interval,
    (c % S) // interval). A map whose shorter side is at most ``group_size`` is a single group. Each query
    attends to the real tokens of its group (padding is masked out): a full [HW, HW] softmax with every
    other key excluded. The bias is the DPB MLP at the difference of the two in-group positions.
    """
    H, W, C = x.shape
    heads, head_dim = attn.num_heads, C // attn.num_heads
    rows, cols = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    if min(H, W) <= group_size:
        group = torch.zeros(H * W, 1, dtype=torch.long)
        pos_r, pos_c = rows, cols
    else:
        span = group_size * interval
        group = torch.stack([rows // span, cols // span, rows % interval, cols % interval], dim=1)
        pos_r, pos_c = (rows % span) // interval, (cols % span) // interval
    same_group = (group[:, None, :] == group[None, :, :]).all(-1)
    offsets = torch.stack([pos_r[:, None] - pos_r[None, :], pos_c[:, None] - pos_c[None, :]], dim=-1)
    bias = attn.pos.layers(attn.pos.proj(offsets.to(x.dtype)))  # [HW, HW, heads]
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(H * W, 3, heads, head_dim).unbind(1)
    logits = torch.einsum('qhd,khd->qkh', q, k) * head_dim ** -0.5 + bias
    weights = logits.masked_fill(~same_group[..., None], float('-inf')).softmax(1)
    out = torch.einsum('qkh,khd->qhd', weights, v).reshape(H, W, C)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('H, W, group_size, interval', [
    (8, 8, 2, 2),    # LDA, no padding
    (11, 13, 3, 2),  # LDA, padded at the bottom and right
    (9, 6, 2, 4),    # LDA with groups made only of padding (region 1, row offsets 1-3)
    (7, 10, 3, 1),   # SDA, padded
    (5, 9, 4, 3),    # shorter side 5 > 4: grouped although the longer side would fit one padded group
    (5, 9, 7, 2),    # shorter side <= group: the whole (non-square) map is one group
    (7, 7, 7, 1),    # map == group: full attention, as at stage 4 of CrossFormer at 224
])
def test_attention_matches_token_by_token_reference(H, W, group_size, interval, fused):
    torch.manual_seed(0)
    dim, heads = 32, 2
    attn = LongShortDistanceAttention(dim, heads, group_size, interval).double().eval()
    attn.fused_attn = fused
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, H, W, dim, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
        for b in range(2):
            torch.testing.assert_close(out[b], reference_group_attention(attn, x[b], group_size, interval),
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('fused', [True, False])
def test_compiled_form_of_an_unpadded_map_gives_the_same_attention(fused, monkeypatch):
    """Eager calls skip the zero padding and the padded-key mask where nothing is padded; a compiled or exported
    graph keeps both for every size (no branch on the map size). Both forms compute the same attention."""
    torch.manual_seed(0)
    attn = LongShortDistanceAttention(32, 2, group_size=4, interval=2).double().eval()
    attn.fused_attn = fused
    x = torch.randn(2, 8, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        eager = attn(x)
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
        torch.testing.assert_close(attn(x), eager, rtol=1e-12, atol=1e-12)
        assert attn.attention_mask(2, 8, 16, 0, 0, 4, 4, 2).shape == (2 * 8, 2, 16, 16)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_all_padding_groups_stay_finite_in_half_precision(dtype, fused):
    """9 x 6 with G 2, I 4 has groups made only of padding; their rows must not turn into NaN (the
    official -1e6 overflows fp16) and poison the position-bias gradient."""
    torch.manual_seed(0)
    attn = LongShortDistanceAttention(32, 2, group_size=2, interval=4).to(dtype)
    attn.fused_attn = fused
    x = torch.randn(1, 9, 6, 32, dtype=dtype, requires_grad=True)
    out = attn(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    for name, p in attn.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_group_layout_follows_the_official_switch():
    assert group_layout(56, 56, 7, 8) == (7, 7, 8)
    assert group_layout(14, 14, 14, 1) == (14, 14, 1)  # CrossFormer++ stage 3 at 224: full attention
    assert group_layout(7, 30, 7, 2) == (7, 30, 1)     # shorter side decides; the interval is dropped
    assert group_layout(8, 30, 7, 2) == (7, 7, 2)


def test_crossformer_pp_stage1_mask_matches_official_shape():
    """Official notes: ++ stage 1 at 224 pads 56 -> 64 for LDA (G 4, I 4), a mask of 256 groups of 16 x 16
    (the LDA block's G and I are checked by test_pp_groups_at_224)."""
    attn = LongShortDistanceAttention(64, 2, group_size=4, interval=4)
    mask = attn.attention_mask(2, 56, 56, 8, 8, 4, 4, 4)
    assert mask.shape == (2 * 256, 2, 16, 16)   # [batch * groups, heads, N, N]
    # a group's padded keys are the same for every query and head: 0 + bias or MASK_VALUE + bias
    padded_cols = (mask - attn.pos(4, 4)) < -1e3
    assert padded_cols.any(-2).eq(padded_cols.all(-2)).all()
    assert padded_cols.any(-3).eq(padded_cols.all(-3)).all()
    # padding covers rows / columns 56-63 of the 64 x 64 map: 64^2 - 56^2 = 960 padded tokens, in each image
    assert padded_cols[:256, 0, 0].sum() == 960 and torch.equal(padded_cols[:256], padded_cols[256:])
    # stage 1 of CrossFormer at 224 needs no padding: the bias alone, one for every group and image
    unpadded = LongShortDistanceAttention(64, 2, group_size=7, interval=8)
    torch.testing.assert_close(unpadded.attention_mask(2, 56, 56, 0, 0, 7, 7, 8), unpadded.pos(7, 7)[None],
                               rtol=0, atol=0)


# ---------------------------------------------------------------- architecture facts of the official code

def block_layouts(model, size=224):
    """Per stage, the (group_h, group_w, interval) every block uses at ``size``."""
    layouts = []
    for i, stage in enumerate(model.stages):
        res = size // (4 * 2 ** i)
        layouts.append([group_layout(res, res, b.attn.group_size, b.attn.interval) for b in stage.blocks])
    return layouts


def test_v1_groups_at_224():
    layouts = block_layouts(meta_model('crossformer_small'))
    assert layouts == [[(7, 7, 1), (7, 7, 8)], [(7, 7, 1), (7, 7, 4)], [(7, 7, 1), (7, 7, 2)] * 3, [(7, 7, 1)] * 2]


def test_pp_groups_at_224():
    layouts = block_layouts(meta_model('crossformer_pp_small'))
    assert layouts == [[(4, 4, 1), (4, 4, 4)], [(4, 4, 1), (4, 4, 2)], [(14, 14, 1)] * 18, [(7, 7, 1)] * 2]


@pytest.mark.parametrize('name, expected', [
    ('crossformer_pp_small', [(2, j) for j in (2, 5, 8, 11, 14)]),
    ('crossformer_pp_base', [(2, j) for j in (2, 5, 8, 11, 14)]),
    ('crossformer_pp_huge', [(0, 2), (1, 2)] + [(2, j) for j in (2, 5, 8, 11, 14)]),
    ('crossformer_small', []),
    ('crossformer_tiny', []),
])
def test_activation_cooling_placement(name, expected):
    model = meta_model(name)
    found = [(i, j) for i, stage in enumerate(model.stages) for j, block in enumerate(stage.blocks)
             if isinstance(block.cooling, ActivationCooling)]
    assert found == expected


def test_layer_decay_groups_follow_the_depth():
    """timm's layer-wise decay groups (``group_matcher``): the stem first, one group per block (a merge
    with its stage's first block), the final norm with the last block, the classifier last; every
    parameter in exactly one."""
    model = timm.create_model('crossformer_pp_small', **TINY_ARCH)
    groups = [{'.'.join(n.split('.')[:3]) for n in group}
              for group in group_parameters(model, model.group_matcher()).values()]
    assert len(groups) == 1 + sum(TINY_ARCH['depths']) + 1
    assert groups[0] == {'stem.projs.0', 'stem.projs.1', 'stem.projs.2', 'stem.projs.3', 'stem.norm.weight',
                         'stem.norm.bias'} and groups[-1] == {'head.fc.weight', 'head.fc.bias'}
    assert groups[3] == {'stages.1.downsample', 'stages.1.blocks'} and {'norm.weight', 'norm.bias'} <= groups[-2]
    names = [n for group in group_parameters(model, model.group_matcher()).values() for n in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_cross_scale_layers_and_dpb_width():
    model = meta_model('crossformer_small')
    stem = [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in model.stem.projs]
    assert stem == [(48, 4, 4, 0), (24, 8, 4, 2), (12, 16, 4, 6), (12, 32, 4, 14)]
    for i, dim in ((1, 192), (2, 384), (3, 768)):
        merge = [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0])
                 for c in model.stages[i].downsample.reductions]
        assert merge == [(dim // 2, dim // 2, 2, 2, 0), (dim // 2, dim // 2, 4, 2, 1)]
    widths = [stage.blocks[0].attn.pos.proj.out_features for stage in model.stages]
    assert widths == [6, 12, 24, 48]  # dim / 16


@pytest.mark.parametrize('name', sorted(CROSSFORMER_OFFICIAL_ARCH))
def test_state_dict_size_matches_official(name):
    """As many entries as the official main-branch model (CrossFormer-S: 344; 368 on the old branch)."""
    assert len(meta_model(name).state_dict()) == OFFICIAL_KEY_COUNTS[name]


# ---------------------------------------------------------------- any input size

@pytest.mark.parametrize('size', [(230, 190), (33, 47)])
def test_features_at_any_size_round_up(size):
    model = timm.create_model('crossformer_pp_small', features_only=True, **TINY_ARCH).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    expected = [(-(-size[0] // r), -(-size[1] // r)) for r in (4, 8, 16, 32)]
    assert [tuple(f.shape[2:]) for f in feats] == expected
    assert [f.shape[1] for f in feats] == [32, 64, 128, 256]
    assert all(torch.isfinite(f).all() for f in feats)


def test_v1_scripts_and_traces_with_padded_groups():
    """The conformance suite scripts and traces the smallest variant (a CrossFormer++); the v1 generation
    (LDA interval 8 in stage 1) at a size whose maps need padded, masked groups must give the same too."""
    with timm.set_scriptable(True):
        model = timm.create_model('crossformer_tiny', **TINY_ARCH).eval()
    x = torch.randn(1, 3, 100, 76)
    scripted, traced = torch.jit.script(model), torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(traced(x), expected)


def test_stem_and_merge_pad_at_bottom_right():
    """An image that is not a multiple of 4 gives what the same image zero-padded at the bottom / right does."""
    model = timm.create_model('crossformer_tiny', **TINY_ARCH).eval()
    x = torch.randn(1, 3, 62, 45)
    with torch.no_grad():
        got = model.forward_intermediates(x, intermediates_only=True)
        padded = model.forward_intermediates(F.pad(x, (0, 3, 0, 2)), intermediates_only=True)
    for a, b in zip(got, padded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('kwargs, match', [
    (dict(group_size=(7, 7, 7)), r'group_size'),
    (dict(interval=(8, 4, 2, 1, 1)), r'interval'),
    (dict(embed_dim=36), 'do not add up to 36'),
    (dict(stem_kernel_sizes=(4, 7)), 'differ from it by an even number'),
    (dict(group_size=(0, 7, 7, 7)), 'group_size and interval must be >= 1'),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('crossformer_small', **kwargs)


# ---------------------------------------------------------------- official checkpoints

@pytest.mark.parametrize('name', sorted(CROSSFORMER_OFFICIAL_ARCH))
def test_official_layout_of_every_variant_converts(name):
    assert_official_layout_converts(name, meta_model(name), checkpoint_filter_fn)


@pytest.mark.parametrize('name', V1_NAMES)
def test_old_branch_layout_of_every_v1_variant_converts(name):
    """The released v1 checkpoints come from the old branch: its DPB buffers are dropped."""
    official = crossformer_official_state_dict(**CROSSFORMER_OFFICIAL_ARCH[name], v1_buffers=True, device='meta')
    assert len(official) == CROSSFORMER_V1_KEY_COUNTS[name]
    model = meta_model(name)
    converted = checkpoint_filter_fn(official, model)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_inverse_rules_give_the_official_names():
    """to_official_layout (used by the wrapper and tool tests) names our state dict as the official code does."""
    for name in ('crossformer_small', 'crossformer_pp_huge'):
        ours = meta_model(name).state_dict()
        official = crossformer_official_state_dict(**CROSSFORMER_OFFICIAL_ARCH[name], device='meta')
        assert set(to_official_layout('crossformer', ours)) == set(official)


# official key -> ours, for keys of every kind
KEY_SAMPLES = {
    'patch_embed.projs.3.weight': 'stem.projs.3.weight',
    'patch_embed.norm.bias': 'stem.norm.bias',
    'layers.0.downsample.norm.weight': 'stages.1.downsample.norm.weight',
    'layers.2.downsample.reductions.1.weight': 'stages.3.downsample.reductions.1.weight',
    'layers.1.blocks.1.attn.pos.pos_proj.weight': 'stages.1.blocks.1.attn.pos.proj.weight',
    'layers.2.blocks.3.attn.pos.pos1.0.weight': 'stages.2.blocks.3.attn.pos.layers.0.0.weight',
    'layers.3.blocks.0.attn.pos.pos3.2.bias': 'stages.3.blocks.0.attn.pos.layers.2.2.bias',
    'layers.2.blocks.1.attn.qkv.weight': 'stages.2.blocks.1.attn.qkv.weight',
    'layers.0.blocks.0.attn.proj.bias': 'stages.0.blocks.0.attn.proj.bias',
    'layers.3.blocks.1.mlp.fc2.weight': 'stages.3.blocks.1.mlp.fc2.weight',
    'layers.2.blocks.0.norm2.bias': 'stages.2.blocks.0.norm2.bias',
    'norm.weight': 'norm.weight',
    'head.weight': 'head.fc.weight',
}
COOLING_SAMPLES = {
    'layers.2.blocks.2.ex_conv.weight': 'stages.2.blocks.2.cooling.conv.weight',
    'layers.2.blocks.2.ex_ln.bias': 'stages.2.blocks.2.cooling.norm.bias',
}


@pytest.mark.parametrize('wrap', CHECKPOINT_WRAPS)
def test_official_pp_checkpoint_loads_strictly(wrap):
    official = crossformer_official_state_dict(activation_cooling=True, **TINY_ARCH)
    model = timm.create_model('crossformer_pp_small', **TINY_ARCH)
    assert_official_checkpoint_loads(official, model, checkpoint_filter_fn, wrap, dict(KEY_SAMPLES, **COOLING_SAMPLES))


def test_official_v1_checkpoint_loads_strictly_without_its_dpb_buffers():
    """The old branch's files also hold each block's DPB offset table and index; they are all that is dropped."""
    official = crossformer_official_state_dict(activation_cooling=False, v1_buffers=True, **TINY_ARCH)
    buffers = [k for k in official if k.endswith(('.attn.biases', '.attn.relative_position_index'))]
    assert len(buffers) == 2 * sum(TINY_ARCH['depths'])
    weights = {k: v for k, v in official.items() if k not in buffers}
    model = timm.create_model('crossformer_small', **TINY_ARCH)
    converted = checkpoint_filter_fn(wrap_as_saved(official, 'model'), model)
    assert converted.keys() == checkpoint_filter_fn(wrap_as_saved(weights, 'model'), model).keys()
    assert_official_checkpoint_loads(weights, model, checkpoint_filter_fn, 'model', KEY_SAMPLES)


def test_generation_mismatch_names_the_cooling_keys():
    model = timm.create_model('crossformer_small', **TINY_ARCH)
    official = crossformer_official_state_dict(activation_cooling=True, **TINY_ARCH)
    with pytest.raises(ValueError, match=r'4 unexpected keys .*stages\.2\.blocks\.2\.cooling.*activation_cooling=True'):
        checkpoint_filter_fn(official, model)


def test_own_state_dict_passes_through_unchanged():
    model = timm.create_model('crossformer_pp_small', **TINY_ARCH)
    sd = model.state_dict()
    converted = checkpoint_filter_fn(sd, model)
    assert list(converted) == list(sd) and all(converted[k] is sd[k] for k in sd)


def test_pretrained_loads_official_file_and_adapts_every_stem_conv(tmp_path):
    official = crossformer_official_state_dict(activation_cooling=True, **TINY_ARCH)
    path = tmp_path / 'crossformer_pp_official_format.pth'
    torch.save({'model': official, 'epoch': 300}, path)
    model = timm.create_model(
        'crossformer_pp_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY_ARCH)
    assert torch.equal(model.stages[2].blocks[2].cooling.conv.weight, official['layers.2.blocks.2.ex_conv.weight'])
    assert torch.equal(model.head.fc.weight, official['head.weight'])

    # one input channel: timm sums the RGB filters of all four stem convolutions, not only the first
    model = timm.create_model(
        'crossformer_pp_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=1,
        num_classes=5, **TINY_ARCH)
    for i, proj in enumerate(model.stem.projs):
        expected = official[f'patch_embed.projs.{i}.weight'].sum(1, keepdim=True)
        torch.testing.assert_close(proj.weight, expected)
    assert model.head.fc.weight.shape == (5, 256)


@pytest.mark.parametrize('name, page', [
    ('crossformer_small', 'https://drive.google.com/file/d/1RAkigsgr33va0RZ85S2Shs2BhXYcS6U8/view?usp=sharing'),
    ('crossformer_pp_huge', 'https://pan.baidu.com/s/1xtPh-ndcOxRM7fPYYxIIRg?pwd=crsf'),
])
def test_pretrained_without_a_file_says_where_the_weights_are(name, page):
    with pytest.raises(RuntimeError, match=r'share page \(' + page.replace('?', r'\?') + r'\).*pretrained_cfg_overlay'):
        timm.create_model(name, pretrained=True)


def test_pretrained_cfgs():
    for name in V1_NAMES + PP_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == 'bicubic'
        assert cfg.num_classes == 1000 and cfg.license == 'mit'
        assert cfg.paper_ids == ('arXiv:2303.06908' if '_pp_' in name else 'arXiv:2108.00154')


# ---------------------------------------------------------------- OpenMMLab configs

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs' / 'crossformer'
# every backbone the official README reports on COCO 1x / ADE20K (v1 S and B, CrossFormer++-S)
EXPECTED_CONFIGS = sorted(
    f'{task}_crossformer-{size}_{suffix}.py'
    for size in ('s', 'b', 'pp-s')
    for task, suffix in (('mask-rcnn', 'fpn_1x_coco'), ('retinanet', 'fpn_1x_coco'),
                         ('fpn', '8xb4-80k_ade20k-512x512'), ('upernet', '8xb2-160k_ade20k-512x512')))
SHALLOW = dict(depths=(2, 2, 3, 2))  # the ++-S widths and heads; one activation cooling layer in stage 3


def test_configs_cover_the_official_results():
    assert sorted(p.name for p in CONFIG_DIR.glob('*.py')) == EXPECTED_CONFIGS


def mm_config(name):
    from mmengine.config import Config
    cfg = Config.fromfile(str(CONFIG_DIR / name))
    cfg.model.backbone.pretrained = False  # no downloads in tests
    cfg.model.backbone.update(SHALLOW)
    return cfg


def mm_build(cfg):
    from mmengine.registry import DefaultScope
    import attnzoo.heads  # noqa: F401  (registers AttnzooBackbone)
    registry = importlib.import_module(f'{cfg.default_scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return registry.build(cfg.model)


@pytest.mark.mm
@needs_mm
@pytest.mark.parametrize('name', EXPECTED_CONFIGS)
def test_config_backbone_settings(name):
    from mmengine.config import Config
    backbone = Config.fromfile(str(CONFIG_DIR / name)).model.backbone
    size = name.split('_')[1].split('-', 1)[1]
    models = {'s': 'crossformer_small', 'b': 'crossformer_base', 'pp-s': 'crossformer_pp_small'}
    assert backbone.model_name == models[size]
    # the official dense-task settings for both generations
    assert tuple(backbone.group_size) == (7, 7, 7, 7) and tuple(backbone.interval) == (8, 4, 2, 1)
    assert backbone.drop_path_rate == (0.3 if size == 'b' else 0.2)


@pytest.mark.mm
@needs_mm
def test_wrapper_loads_an_official_file(tmp_path):
    """An official-layout CrossFormer++ file through AttnzooBackbone(checkpoint=...), with the dense settings."""
    from attnzoo.heads import AttnzooBackbone
    torch.manual_seed(0)
    source = timm.create_model('crossformer_pp_small', **SHALLOW)
    path = tmp_path / 'crossformer_pp_s.pth'
    torch.save({'model': to_official_layout('crossformer', source.state_dict())}, path)
    backbone = AttnzooBackbone('crossformer_pp_small', checkpoint=str(path), group_size=(7, 7, 7, 7),
                               interval=(8, 4, 2, 1), **SHALLOW)
    backbone.init_weights()  # where OpenMMLab backbones load their pretrained weights
    expected = source.state_dict()
    loaded = backbone.features.model.state_dict()
    assert len(loaded) == len(expected) - 4  # the features model has no final norm and classifier
    for name, value in loaded.items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.mm
@needs_mm
@pytest.mark.parametrize('name', [
    'retinanet_crossformer-pp-s_fpn_1x_coco.py',
    # the same backbone path under a two-stage detector with masks; CI's budget leaves it out
    pytest.param('mask-rcnn_crossformer-pp-s_fpn_1x_coco.py', marks=pytest.mark.slow),
])
def test_detector_loss_backward_predict(name):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    import numpy as np
    torch.manual_seed(0)
    cfg = mm_config(name)
    with_masks = name.startswith('mask-rcnn')
    test_cfg = cfg.model.test_cfg.rcnn if with_masks else cfg.model.test_cfg
    test_cfg.update(score_thr=0., max_per_img=10)
    model = mm_build(cfg).train()
    h, w = 96, 128
    boxes = torch.tensor([[10., 20., 60., 70.], [50., 10., 120., 90.]])
    masks = np.zeros((2, h, w), dtype=np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    samples = []
    for _ in range(2):
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.)))
        sample.gt_instances = InstanceData(bboxes=boxes.clone(), labels=torch.tensor([1, 5]))
        if with_masks:
            sample.gt_instances.masks = BitmapMasks(masks, h, w)
        samples.append(sample)
    batch = dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for _ in range(2)], data_samples=samples)
    losses = model(**model.data_preprocessor(batch, training=True), mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss) and ('loss_mask' in losses) == with_masks
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(batch, training=False), mode='predict')
    assert len(results) == 2 and all(len(r.pred_instances) for r in results)
    if with_masks:
        assert all(tuple(r.pred_instances.masks.shape[1:]) == (h, w) for r in results)


@pytest.mark.mm
@needs_mm
@pytest.mark.parametrize('name', [
    'upernet_crossformer-pp-s_8xb2-160k_ade20k-512x512.py',
    # the same backbone path as UPerNet's; CI's budget leaves it out
    pytest.param('fpn_crossformer-pp-s_8xb4-80k_ade20k-512x512.py', marks=pytest.mark.slow),
])
def test_segmentor_loss_backward_predict(name):
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData
    torch.manual_seed(0)
    cfg = mm_config(name)
    size = (96, 128)
    cfg.model.data_preprocessor.size = size
    model = mm_build(cfg).train()
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=size, ori_shape=size))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, *size)))
        samples.append(sample)
    batch = dict(inputs=[torch.randint(0, 256, (3, *size), dtype=torch.uint8) for _ in range(2)], data_samples=samples)
    losses = model(**model.data_preprocessor(batch, training=True), mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(batch, training=False), mode='predict')
    assert [tuple(r.pred_sem_seg.data.shape) for r in results] == [(1, *size)] * 2


def test_dropout_after_the_stem_as_the_official_pos_drop():
    """The official model drops out the patch embedding (pos_drop, p = its drop_rate, our proj_drop_rate)
    before the first stage: in training about half the stem's outputs are zeroed at p = 0.5, none in eval."""
    model = timm.create_model('crossformer_tiny', proj_drop_rate=0.5, **TINY_ARCH)
    stem_out = []
    model.stages[0].register_forward_pre_hook(lambda module, args: stem_out.append(args[0]))
    x = torch.randn(2, 3, 64, 64)
    model.train()(x)
    zeros = (stem_out[-1] == 0).float().mean().item()
    assert 0.4 < zeros < 0.6
    model.eval()(x)
    assert (stem_out[-1] == 0).sum() == 0
