"""MOAT / tiny-MOAT: what the conformance suite (tests/test_models.py) does not cover.

Official parity without TensorFlow: tests/data/moat_official holds a checkpoint the official deeplab2 code
wrote (a reduced MOAT, official variable names, EMA copies, optimizer slots) and that code's outputs on it
(classifier logits with resized position tables; dense features with windows, shortcut pool 3 and global
attention at the end of the MOAT stages); its make_fixture.py says how they were made. The converter must
turn that checkpoint into weights that reproduce those outputs. The layers are checked against
brute-force references written from the official definitions.
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from attnzoo.backbones import moat
from mm_stack import MM_MISSING, SKIP_REASON
from reference_params import OFFICIAL_PARAMS
from tf_checkpoints import write_tensor_bundle

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
DATA = Path(__file__).resolve().parent / 'data' / 'moat_official'
sys.path.insert(0, str(TOOLS))
import _runtime as runtime  # noqa: E402
import convert as convert_tool  # noqa: E402

# the reduced architecture of the official fixture (make_fixture.py: REDUCED)
REDUCED = dict(stem_width=(8, 8), embed_dim=(16, 16, 32, 32), depths=(1, 2, 2, 2), head_dim=16, expand_ratio=2,
               num_classes=10)
DENSE = dict(window_size=(None, None, 4, 2), shortcut_pool_size=3, global_attention_at_end_of_moat_stage=True)
SHALLOW = dict(depths=(1, 1, 2, 1))  # tiny-MOAT-0 widths, fewer blocks (both MOAT-stage blocks: window, then global)
VARIANTS = sorted(name for name in timm.list_models(module='moat'))


def fixture_image(height, width):
    """make_fixture.py's fixture_image, as an NCHW tensor."""
    values = np.arange(height * width * 3) * 7919 % 1009
    return torch.from_numpy((values / 504.5 - 1).astype(np.float32).reshape(1, height, width, 3)).permute(0, 3, 1, 2)


def images(*size, batch=1, seed=0):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- variants

def test_every_variant_is_registered_with_its_official_count():
    sizes = ['moat_0', 'moat_1', 'moat_2', 'moat_3', 'moat_4', 'tiny_moat_0', 'tiny_moat_1', 'tiny_moat_2', 'tiny_moat_3']
    assert VARIANTS == sorted(sizes + [f'{n}_no_pe' for n in sizes])
    assert all(name in OFFICIAL_PARAMS for name in VARIANTS)  # counts: tests/test_models.py


@pytest.mark.parametrize('name, size, mean', [
    ('moat_0', 224, timm.data.IMAGENET_DEFAULT_MEAN), ('moat_1_no_pe', 224, timm.data.IMAGENET_DEFAULT_MEAN),
    ('moat_2', 384, (0.5,) * 3), ('moat_3_no_pe', 512, (0.5,) * 3), ('moat_4', 512, (0.5,) * 3),
    ('tiny_moat_0', 256, timm.data.IMAGENET_DEFAULT_MEAN), ('tiny_moat_3_no_pe', 256, timm.data.IMAGENET_DEFAULT_MEAN),
])
def test_pretrained_cfgs_follow_the_official_checkpoint_table(name, size, mean):
    """Input size and normalisation (option 1: ImageNet mean / std; option 2: [-1, 1]) of each checkpoint."""
    cfg = timm.get_pretrained_cfg(name)
    assert cfg.input_size == (3, size, size) and cfg.pool_size == (size // 32, size // 32)
    assert tuple(cfg.mean) == tuple(mean)
    assert tuple(cfg.std) == (timm.data.IMAGENET_DEFAULT_STD if mean != (0.5,) * 3 else (0.5,) * 3)
    pe = 'wo' if name.endswith('no_pe') else 'w'
    assert cfg.url.endswith(f'_{size}_{pe}_position_embedding.tar.gz')
    assert f'/{name.replace("_no_pe", "").replace("moat_", "moat")}_imagenet_' in cfg.url


@pytest.mark.parametrize('name', ['tiny_moat_0', 'tiny_moat_0.tf_in1k'])
def test_pretrained_without_a_converted_file_says_how_to_convert(name):
    with pytest.raises(RuntimeError, match='tools/convert.py <unpacked checkpoint prefix> --model tiny_moat_0'):
        timm.create_model(name, pretrained=True)


def test_position_tables_are_the_official_sizes():
    model = timm.create_model('tiny_moat_0', device='meta')
    tables = {n: tuple(p.shape) for n, p in model.named_parameters() if 'relative_position' in n}
    assert len(tables) == 7 + 2
    assert tables['stages.2.blocks.0.attn.relative_position_bias_table'] == (4, 27, 27)  # 128 / 32 heads, 2 * 14 - 1
    assert tables['stages.3.blocks.1.attn.relative_position_bias_table'] == (8, 13, 13)
    assert not any('relative_position' in n for n, _ in timm.create_model('tiny_moat_0_no_pe', device='meta').named_parameters())


def test_se_only_in_mbconv_stages_and_no_mlp_after_attention():
    model = timm.create_model('tiny_moat_0', device='meta')
    for i, stage in enumerate(model.stages):
        for block in stage.blocks:
            if i < 2:
                assert isinstance(block, moat.MbConvBlock) and isinstance(block.se, timm.layers.SEModule)
                assert block.se.fc1.out_channels == int(0.25 * block.conv3_1x1.out_channels)
            else:
                assert isinstance(block, moat.MoatBlock) and isinstance(block.conv.se, torch.nn.Identity)
                assert {name for name, _ in block.named_children()} == {'conv', 'norm', 'attn', 'drop_path'}
    bn = model.stem.norm1
    assert bn.eps == 1e-3 and isinstance(bn.act, torch.nn.GELU) and bn.act.approximate == 'none'
    assert model.stages[2].blocks[0].norm.eps == 1e-5 and model.head.norm.eps == 1e-5


def test_stochastic_depth_follows_the_official_schedule():
    """Block i of N drops with rate * i / N (official survival_prob = 1 - rate * i / N)."""
    model = timm.create_model('tiny_moat_0', drop_path_rate=0.2, device='meta')
    rates = []
    for stage in model.stages:
        for block in stage.blocks:
            drop_path = block.conv.drop_path if isinstance(block, moat.MoatBlock) else block.drop_path
            rates.append(getattr(drop_path, 'drop_prob', 0.))
    assert rates == pytest.approx([0.2 * i / 14 for i in range(14)])


def test_window_options():
    model = timm.create_model('tiny_moat_0', device='meta', **DENSE)
    windows = [block.attn.window_size for stage in model.stages[2:] for block in stage.blocks]
    assert windows == [(4, 4)] * 6 + [None] + [(2, 2), None]  # the last block of each MOAT stage is global
    model = timm.create_model('tiny_moat_0', device='meta', window_size=(None, None, (6, 8), 2))
    assert model.stages[2].blocks[0].attn.window_size == (6, 8) and model.stages[3].blocks[1].attn.window_size == (2, 2)
    with pytest.raises(ValueError, match='stage 1 is a mbconv stage'):
        timm.create_model('tiny_moat_0', device='meta', window_size=(None, 7, 14, 7))
    with pytest.raises(ValueError, match='one entry per stage'):
        timm.create_model('tiny_moat_0', device='meta', window_size=(14, 7))
    with pytest.raises(ValueError, match='positive int'):
        timm.create_model('tiny_moat_0', device='meta', window_size=(None, None, 0, 7))


# ---------------------------------------------------------------- layers against brute-force references

def official_lookup(length):
    """deeplab2's generate_lookup_tensor: lookup[i, x, v] = 1 iff v = x - i + length - 1."""
    lookup = np.zeros((length, length, 2 * length - 1))
    for i in range(length):
        for x in range(length):
            lookup[i, x, x - i + length - 1] = 1
    return torch.from_numpy(lookup).float()


@pytest.mark.parametrize('win_h, win_w', [(4, 4), (3, 5), (1, 2)])
def test_relative_position_bias_is_the_official_reindexing(win_h, win_w):
    table = torch.randn(3, 2 * win_h - 1, 2 * win_w - 1)
    # deeplab2's reindex_2d_einsum_lookup
    expected = torch.einsum('nhw,ixh->nixw', table, official_lookup(win_h))
    expected = torch.einsum('nixw,jyw->nijxy', expected, official_lookup(win_w)).reshape(3, win_h * win_w, -1)
    torch.testing.assert_close(moat.relative_position_bias(table, win_h, win_w), expected)


def test_relative_position_table_is_resized_with_half_pixel_centres():
    table = torch.randn(2, 27, 27)
    resized = moat.relative_position_bias(table, 6, 4)
    # bilinear, half-pixel centres (tf.image.resize): output pixel o samples input (o + 0.5) * in / out - 0.5
    def sample(axis_in, axis_out, o):
        pos = min(max((o + 0.5) * axis_in / axis_out - 0.5, 0), axis_in - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, axis_in - 1)
        return lo, hi, pos - lo
    manual = torch.empty(2, 11, 7)
    for r in range(11):
        r0, r1, fr = sample(27, 11, r)
        for c in range(7):
            c0, c1, fc = sample(27, 7, c)
            top = table[:, r0, c0] * (1 - fc) + table[:, r0, c1] * fc
            bottom = table[:, r1, c0] * (1 - fc) + table[:, r1, c1] * fc
            manual[:, r, c] = top * (1 - fr) + bottom * fr
    torch.testing.assert_close(resized, moat.relative_position_bias(manual, 6, 4))


@pytest.mark.parametrize('size, kernel', [((8, 8), 2), ((7, 5), 2), ((8, 6), 3), ((7, 9), 3)])
def test_shortcut_pool_is_tensorflow_same_average_pooling(size, kernel):
    """Windows start at 0 with stride 2; TF pads at the end only as needed; padded pixels do not count."""
    x = images(*size, batch=2)
    got = moat.avg_pool_tf_same(x, kernel, 2)
    out_h, out_w = -(-size[0] // 2), -(-size[1] // 2)
    total_h = max((out_h - 1) * 2 + kernel - size[0], 0)
    total_w = max((out_w - 1) * 2 + kernel - size[1], 0)
    top, left = total_h // 2, total_w // 2
    expected = torch.empty(2, 3, out_h, out_w)
    for i in range(out_h):
        for j in range(out_w):
            rows = slice(max(i * 2 - top, 0), min(i * 2 - top + kernel, size[0]))
            cols = slice(max(j * 2 - left, 0), min(j * 2 - left + kernel, size[1]))
            expected[:, :, i, j] = x[:, :, rows, cols].mean(dim=(-2, -1))
    torch.testing.assert_close(got, expected)


def reference_window_attention(attn, x):
    """Each window (clipped to the map) attends over its own tokens only, with the table resized to the
    configured window and indexed by the tokens' offsets."""
    B, H, W, C = x.shape
    win_h, win_w = attn.window_size or (H, W)
    heads, d = attn.num_heads, attn.head_dim
    table = attn.relative_position_bias_table
    full_bias = moat.relative_position_bias(table, win_h, win_w).reshape(heads, win_h, win_w, win_h, win_w)
    out = torch.zeros(B, H, W, C)
    for top in range(0, H, win_h):
        for left in range(0, W, win_w):
            h, w = min(win_h, H - top), min(win_w, W - left)
            tokens = x[:, top:top + h, left:left + w].reshape(B, h * w, C)
            q, k, v = attn.qkv(tokens).reshape(B, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
            logits = q @ k.transpose(-2, -1) * d ** -0.5
            logits = logits + full_bias[:, :h, :w, :h, :w].reshape(heads, h * w, h * w)
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, h * w, C)
            out[:, top:top + h, left:left + w] = attn.proj(o).reshape(B, h, w, C)
    return out


@pytest.mark.parametrize('window, size, fused', [
    (None, (5, 3), True), ((4, 4), (8, 8), True), ((4, 4), (7, 5), True), ((4, 4), (7, 5), False),
    ((3, 5), (4, 11), True), ((6, 6), (3, 4), False),
])
def test_window_attention_against_a_per_window_reference(window, size, fused):
    """Padded keys are masked: every valid token sees exactly the valid tokens of its window."""
    torch.manual_seed(0)
    attn = moat.MoatAttention(32, head_dim=8, window_size=window, position_embedding_size=4).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.)
    attn.fused_attn = fused
    x = torch.randn(2, *size, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_window_attention(attn, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- official parity (the official code's own outputs)

@pytest.fixture(scope='module')
def converted_official(tmp_path_factory):
    out = tmp_path_factory.mktemp('moat') / 'reduced.safetensors'
    convert_tool.main([str(DATA / 'official.ckpt'), '--model', 'tiny_moat_0', '-o', str(out),
                       '--model-kwargs', *[f'{k}={v}' for k, v in REDUCED.items()]])
    return out


def test_converted_official_checkpoint_gives_the_official_logits(converted_official):
    """Global attention on 96x80 (stride-16 table 27x27 resized to 11x9, stride-32 13x13 to 5x5)."""
    model = timm.create_model('tiny_moat_0', pretrained=True, **REDUCED,
                              pretrained_cfg_overlay=dict(file=str(converted_official), num_classes=10)).eval()
    expected = np.load(DATA / 'official_io.npz')['logits']
    with torch.no_grad():
        logits = model(fixture_image(96, 80))
    np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=1e-4)


def test_a_tagged_name_loads_a_converted_file(converted_official):
    """create_model('name.tag') hands the tag on as pretrained_cfg (a string), with the file overlay."""
    tagged = timm.create_model('tiny_moat_0.tf_in1k', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(converted_official), num_classes=10), **REDUCED)
    plain = timm.create_model('tiny_moat_0', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(converted_official), num_classes=10), **REDUCED)
    assert tagged.pretrained_cfg['tag'] == 'tf_in1k'
    for key, value in plain.state_dict().items():
        assert torch.equal(tagged.state_dict()[key], value), key


def test_converted_official_checkpoint_gives_the_official_dense_features(converted_official):
    """Windows 4x4 / 2x2 with global attention at the end of each MOAT stage and shortcut pool 3 (the
    official dense-task setting), on 128x64: the official endpoints stage4 / stage5 are our features 3 / 4."""
    model = timm.create_model('tiny_moat_0', pretrained=True, pretrained_cfg_overlay=dict(file=str(converted_official)),
                              features_only=True, out_indices=(3, 4), **REDUCED, **DENSE).eval()
    expected = np.load(DATA / 'official_io.npz')
    with torch.no_grad():
        stage4, stage5 = model(fixture_image(128, 64))
    np.testing.assert_allclose(stage4.permute(0, 2, 3, 1).numpy(), expected['stage4'], rtol=0, atol=1e-4)
    np.testing.assert_allclose(stage5.permute(0, 2, 3, 1).numpy(), expected['stage5'], rtol=0, atol=1e-4)


def test_the_trained_values_are_not_the_ema_ones(tmp_path):
    """The fixture's trained values are random: taking them (--no-ema) must not give the official logits."""
    out = tmp_path / 'raw.safetensors'
    convert_tool.main([str(DATA / 'official.ckpt'), '--model', 'tiny_moat_0', '-o', str(out), '--no-ema',
                       '--model-kwargs', *[f'{k}={v}' for k, v in REDUCED.items()]])
    model = timm.create_model('tiny_moat_0', pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=10),
                              **REDUCED)
    with torch.no_grad():
        logits = model.eval()(fixture_image(96, 80)).numpy()
    assert np.abs(logits - np.load(DATA / 'official_io.npz')['logits']).max() > 1e-2


# ---------------------------------------------------------------- the full-size official layout

def official_layout(name):
    """Name -> shape of every variable of the official tiny-MOAT-0 (recorded by make_fixture.py)."""
    return json.loads((DATA / 'tiny_moat_0_variables.json').read_text())[name]


@pytest.mark.parametrize('name, official', [('tiny_moat_0', 'tiny_moat0_pretrain_256_1k'),
                                            ('tiny_moat_0_no_pe', 'tiny_moat0_pretrain_256_no_pe_1k')])
def test_every_official_variable_lands_in_its_layer(tmp_path, name, official):
    """A checkpoint of the official tiny-MOAT-0 layout, built here (random values; EMA copies of the
    trainable variables, an Adam slot, global_step), converted: every value is where the official layer
    puts it, in PyTorch's layout."""
    rng = np.random.default_rng(0)
    layout = official_layout(official)
    values = {n: rng.normal(size=shape).astype(np.float32) for n, shape in layout.items()}
    if name == 'tiny_moat_0':
        assert len(layout) == 361 and sum(int(np.prod(s)) for n, s in layout.items() if 'moving' not in n) == \
            OFFICIAL_PARAMS['tiny_moat_0']
    tensors = {'global_step': np.array(7, dtype=np.int64)}
    for n, value in values.items():
        if 'moving' in n:
            tensors[n] = np.abs(value)
        else:
            tensors[n] = np.zeros_like(value)  # the trained values; the EMA copies win
            tensors[f'{n}/ExponentialMovingAverage'] = value
            tensors[f'{n}/Adam'] = value + 1
    write_tensor_bundle(str(tmp_path / 'model.ckpt-1'), tensors)
    out = tmp_path / 'converted.safetensors'
    convert_tool.main([str(tmp_path), '--model', name, '-o', str(out)])
    state = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).state_dict()
    t = lambda n: torch.from_numpy(values[f'moat/{n}'])  # noqa: E731
    stem = t('stem/conv_0/kernel')  # [kh, kw, in, out]
    assert torch.equal(state['stem.conv1.weight'][5, 1, 2, 0], stem[2, 0, 1, 5])
    assert torch.equal(state['stem.norm1.running_var'], torch.from_numpy(tensors['moat/stem/norm_0/moving_variance']))
    assert torch.equal(state['stem.norm1.weight'], t('stem/norm_0/gamma'))
    dw = t('block_01_00/depthwise_conv/depthwise_kernel')  # [kh, kw, C, 1]
    assert torch.equal(state['stages.1.blocks.0.conv2_kxk.weight'][:, 0], dw[..., 0].permute(2, 0, 1))
    assert torch.equal(state['stages.1.blocks.0.shortcut.expand.weight'][:, :, 0, 0],
                       t('block_01_00/shortcut_conv/kernel')[0, 0].t())
    assert torch.equal(state['stages.0.blocks.1.se.fc2.bias'], t('block_00_01/se/expand_conv2d/bias'))
    assert torch.equal(state['stages.2.blocks.3.conv.conv3_1x1.weight'][:, :, 0, 0],
                       t('block_02_03/shrink_conv/kernel')[0, 0].t())
    assert torch.equal(state['stages.2.blocks.3.norm.bias'], t('block_02_03/attention_norm/beta'))
    # q, k, v [C, heads, head_dim] one after the other; the output projection [heads, head_dim, C]
    qkv_w, qkv_b = state['stages.3.blocks.1.attn.qkv.weight'], state['stages.3.blocks.1.attn.qkv.bias']
    for i, part in enumerate('qkv'):
        weight = t(f'block_03_01/attention/{part}/weight')
        rows = slice(i * 256, (i + 1) * 256)
        assert torch.equal(qkv_w[rows][3 * 32 + 5], weight[:, 3, 5])
        assert torch.equal(qkv_b[rows][3 * 32 + 5], t(f'block_03_01/attention/{part}/bias')[3, 5])
    assert torch.equal(state['stages.3.blocks.1.attn.proj.weight'][:, 3 * 32 + 5], t('block_03_01/attention/o/weight')[3, 5])
    if name == 'tiny_moat_0':
        assert torch.equal(state['stages.2.blocks.0.attn.relative_position_bias_table'],
                           t('block_02_00/attention/relative_position_embedding'))
    assert torch.equal(state['head.norm.weight'], t('final_layer_norm/gamma'))
    assert torch.equal(state['head.fc.weight'], t('logits_head/kernel')[0, 0].t())


def test_position_embedding_mismatch_names_the_other_variant(tmp_path):
    layout = official_layout('tiny_moat0_pretrain_256_1k')
    write_tensor_bundle(str(tmp_path / 'model.ckpt-1'), {n: np.zeros(s, np.float32) for n, s in layout.items()})
    with pytest.raises(runtime.ToolError, match='relative_position_bias_table.*_no_pe'):
        convert_tool.main([str(tmp_path), '--model', 'tiny_moat_0_no_pe', '-o', str(tmp_path / 'out.safetensors')])
    missing = {n: np.zeros(s, np.float32) for n, s in layout.items() if not n.endswith('attention/k/weight')}
    write_tensor_bundle(str(tmp_path / 'model.ckpt-1'), missing)
    with pytest.raises(runtime.ToolError, match='qkv.weight'):
        convert_tool.main([str(tmp_path), '--model', 'tiny_moat_0', '-o', str(tmp_path / 'out.safetensors')])


# ---------------------------------------------------------------- any size, TorchScript, FX, compile

@pytest.fixture(scope='module')
def dense_model():
    torch.manual_seed(0)
    model = timm.create_model('tiny_moat_0', window_size=(None, None, 4, 3), shortcut_pool_size=3,
                              global_attention_at_end_of_moat_stage=True, **SHALLOW).eval()
    for name, p in model.named_parameters():
        if name.endswith('relative_position_bias_table'):
            torch.nn.init.normal_(p, std=1.)
    return model


@pytest.mark.parametrize('size', [(100, 70), (33, 45), (64, 64)])
def test_features_only_on_odd_sizes_with_windows(size):
    model = timm.create_model('tiny_moat_0', features_only=True, window_size=(None, None, 7, 7), **SHALLOW).eval()
    with torch.no_grad():
        features = model(images(*size))
    assert [f.shape[1] for f in features] == [32, 32, 64, 128, 256]
    for feature, reduction in zip(features, model.feature_info.reduction()):
        assert feature.shape[2:] == (-(-size[0] // reduction), -(-size[1] // reduction))
        assert torch.isfinite(feature).all()


def test_dense_model_scripts_traces_and_compiles(dense_model):
    """The window path with padding (a 100x76 input: 7x5 and 4x3 maps) and resized position tables, through
    TorchScript, plain FX and torch.compile (one graph)."""
    x = images(100, 76)
    # a fresh Dynamo state, as a user's process: the model API's forward is one code object for every family
    # (PyramidBackbone), and after earlier tests' compiles at other sizes Dynamo traces it with symbolic sizes
    torch._dynamo.reset()
    with torch.no_grad():
        expected = dense_model(x)
        torch.testing.assert_close(torch.jit.script(dense_model)(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.fx.symbolic_trace(dense_model)(x), expected)
        compiled = torch.compile(dense_model, backend='aot_eager', fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


def test_window_equal_to_the_map_is_global_attention(dense_model):
    """At 128x96 the stride-16 map is 8x6: a 8x6 window is the whole map, i.e. the classification model."""
    global_model = timm.create_model('tiny_moat_0', shortcut_pool_size=3, **SHALLOW).eval()
    windowed = timm.create_model('tiny_moat_0', window_size=(None, None, (8, 6), (4, 3)), shortcut_pool_size=3,
                                 **SHALLOW).eval()
    windowed.load_state_dict(global_model.state_dict())
    x = images(128, 96)
    with torch.no_grad():
        torch.testing.assert_close(windowed(x), global_model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- OpenMMLab (configs/moat)

CONFIG_DIR = Path(__file__).resolve().parents[1] / 'configs' / 'moat'
MOAT_CONFIGS = sorted(CONFIG_DIR.glob('*.py'))


def openmmlab():
    """tests/test_heads.py's helpers; skips cleanly without the OpenMMLab stack."""
    if MM_MISSING:
        pytest.skip(SKIP_REASON)
    import test_heads
    return test_heads


@pytest.mark.mm
@pytest.mark.parametrize('path', MOAT_CONFIGS, ids=lambda p: p.name)
def test_configs_name_their_backbone_and_its_channels(path):
    """Each config: the backbone its name says, the four stride-4..32 stages, the neck / heads sized for
    them, window attention as the official dense tasks use it. (tests/test_heads.py builds every config.)"""
    mm = openmmlab()
    cfg = mm.Config.fromfile(str(path))
    backbone = cfg.model.backbone
    size = path.name.split('_')[1]  # e.g. tiny-moat-2
    assert backbone.model_name == size.replace('-moat-', '_moat_').replace('moat-', 'moat_')
    assert backbone.out_indices == (1, 2, 3, 4)
    assert backbone.window_size == (None, None, 14, 7) and backbone.global_attention_at_end_of_moat_stage
    assert backbone.shortcut_pool_size == 3
    info = timm.create_model(backbone.model_name, device='meta').feature_info
    channels = [info[i]['num_chs'] for i in backbone.out_indices]
    assert [info[i]['reduction'] for i in backbone.out_indices] == [4, 8, 16, 32]
    if 'neck' in cfg.model:
        assert list(cfg.model.neck.in_channels) == channels
    else:
        assert list(cfg.model.decode_head.in_channels) == channels
        assert cfg.model.auxiliary_head.in_channels == channels[cfg.model.auxiliary_head.in_index]
    assert {path.name.split('_')[0] for path in MOAT_CONFIGS} == {'mask-rcnn', 'upernet'}


@pytest.mark.mm
@pytest.mark.slow  # the same wrapper and backbone as the UPerNet test below; mmdet's heads cost a minute on CPU
def test_tiny_moat_mask_rcnn_loss_backward_and_predict():
    """tiny-MOAT-2 (one block in most stages; two in stage 3: a windowed and a global one) in its Mask
    R-CNN config, on 128x160 images: the 8x10 stride-16 map is padded to one 14x14 window."""
    mm = openmmlab()
    torch.manual_seed(0)
    cfg = mm.load_config(CONFIG_DIR / 'mask-rcnn_tiny-moat-2_fpn_1x_coco.py')
    cfg.model.backbone.update(SHALLOW)
    cfg.model.test_cfg.rcnn.update(score_thr=0., max_per_img=10)
    model = mm.build_model(cfg).train()
    data = model.data_preprocessor(mm.det_batch(with_masks=True), training=True)
    losses = model(**data, mode='loss')
    assert {'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'} <= set(losses)
    mm.total_loss(model, losses).backward()
    # frozen BatchNorm statistics (norm_eval), trainable weights
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    grads = mm.backbone_grads(model)
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(mm.det_batch(with_masks=False), training=False), mode='predict')
    mm.check_detections(results, with_masks=True)


@pytest.mark.mm
def test_tiny_moat_upernet_loss_and_predict():
    mm = openmmlab()
    torch.manual_seed(0)
    cfg = mm.load_config(CONFIG_DIR / 'upernet_tiny-moat-2_8xb2-160k_ade20k-512x512.py')
    cfg.model.backbone.update(SHALLOW)
    cfg.model.data_preprocessor.size = mm.SEG_SIZE
    model = mm.build_model(cfg).train()
    losses = model(**model.data_preprocessor(mm.seg_batch(), training=True), mode='loss')
    mm.total_loss(model, losses).backward()
    assert all(g is not None and torch.isfinite(g).all() for g in mm.backbone_grads(model))
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(mm.seg_batch(seed=1), training=False), mode='predict')
    assert [tuple(r.pred_sem_seg.data.shape) for r in results] == [(1, *mm.SEG_SIZE)] * 2


def test_pretrained_config_without_converted_weights_fails_clearly():
    """A config's pretrained=True without checkpoint= reaches the model's own message."""
    with pytest.raises(RuntimeError, match='TensorFlow checkpoint archives'):
        timm.create_model('tiny_moat_2', pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
