"""tools/tensorbundle.py (TensorFlow checkpoints without TensorFlow) and tools/convert.py.

The reader is checked against a checkpoint TensorFlow itself wrote (tests/data/tf_checkpoint, made by its
make_checkpoint.py, whose values are re-derived here) and against damaged copies of it. The converter's
MOAT path (official variable names and layouts) is tested in tests/test_moat.py.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from attnzoo.backbones._checkpoint import (
    CheckpointError, CheckpointMismatchError, load_checkpoint_file, unwrap_checkpoint)
from attnzoo.backbones._families import checkpoint_filter_of, family_of, supported_families
from official_checkpoints import (
    CHECKPOINT_WRAPS, CROSSFORMER_OFFICIAL_ARCH, CSWIN_OFFICIAL_ARCH, LITV2_OFFICIAL_ARCH, NAT_OFFICIAL_ARCH,
    crossformer_official_state_dict, cswin_official_state_dict, litv2_official_state_dict, nat_official_state_dict,
    to_official_layout, wrap_as_saved)
from tf_checkpoints import write_tensor_bundle

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
sys.path.insert(0, str(TOOLS))
import _checkpoints as checkpoints  # noqa: E402
import _runtime as runtime  # noqa: E402
import convert as convert_tool  # noqa: E402
from tensorbundle import TensorBundle, TensorBundleError, read_tensor_bundle, resolve_checkpoint_prefix  # noqa: E402

TF_FIXTURE = Path(__file__).resolve().parent / 'data' / 'tf_checkpoint' / 'tf_checkpoint'


# ---------------------------------------------------------------- the reader, on TensorFlow's own file

def test_reads_every_tensor_tensorflow_wrote():
    bundle = TensorBundle(TF_FIXTURE)
    assert len(bundle) == 410 and bundle.num_shards == 1
    kernel = np.arange(3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4) / 10
    np.testing.assert_array_equal(bundle.read('moat/stem/conv_0/kernel').numpy(), kernel)
    np.testing.assert_array_equal(bundle.read('moat/stem/conv_0/kernel/ExponentialMovingAverage').numpy(), -kernel)
    half = bundle.read('half')
    assert half.dtype == torch.float16
    np.testing.assert_array_equal(half.numpy(), np.linspace(-2, 2, 7).astype(np.float16))
    brain = bundle.read('brain')
    assert brain.dtype == torch.bfloat16
    torch.testing.assert_close(brain, torch.linspace(-3, 3, 5).to(torch.bfloat16), rtol=0, atol=0)
    double = bundle.read('double')
    assert double.dtype == torch.float64 and double.tolist() == [[1.5, -2.25]]
    step = bundle.read('global_step')
    assert step.dtype == torch.int64 and step.shape == () and step.item() == 123456789012
    assert bundle.read('int32').tolist() == [-7, 0, 7]
    assert bundle.read('flags').tolist() == [True, False, True]
    assert bundle.read('empty').shape == (0, 3)
    # 400 keys span several index blocks and many restart points
    for i in (0, 15, 16, 17, 255, 399):
        assert bundle.read(f'filler/layer_{i:03d}/weight').tolist() == [float(i)] * 2


def test_non_numeric_tensors_are_named_and_skipped():
    bundle = TensorBundle(TF_FIXTURE)
    with pytest.raises(TensorBundleError, match='words has TF dtype string'):
        bundle.read('words')
    everything = read_tensor_bundle(TF_FIXTURE)
    assert 'words' not in everything and len(everything) == 409
    with pytest.raises(KeyError, match='not_there'):
        bundle.read('not_there')


def test_the_prefix_index_data_file_or_directory_all_name_the_checkpoint(tmp_path):
    directory = tmp_path / 'ckpt'
    directory.mkdir()
    for path in TF_FIXTURE.parent.glob('tf_checkpoint.*'):
        shutil.copy(path, directory / path.name.replace('tf_checkpoint', 'model.ckpt-100'))
    prefix = directory / 'model.ckpt-100'
    for given in (prefix, f'{prefix}.index', f'{prefix}.data-00000-of-00001', directory):
        assert resolve_checkpoint_prefix(given) == prefix
    shutil.copy(f'{prefix}.index', directory / 'model.ckpt-200.index')
    with pytest.raises(TensorBundleError, match='2 checkpoint indexes'):
        resolve_checkpoint_prefix(directory)
    (directory / 'checkpoint').write_text('model_checkpoint_path: "model.ckpt-100"\n'
                                          'all_model_checkpoint_paths: "model.ckpt-100"\n')
    assert resolve_checkpoint_prefix(directory) == prefix


def copy_fixture(tmp_path):
    for path in TF_FIXTURE.parent.glob('tf_checkpoint.*'):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / 'tf_checkpoint'


def test_damaged_files_say_what_is_wrong(tmp_path):
    prefix = copy_fixture(tmp_path)
    index = Path(f'{prefix}.index')
    data = Path(f'{prefix}.data-00000-of-00001')
    good_index = index.read_bytes()

    index.write_bytes(good_index[:-1])  # the footer's magic number cut
    with pytest.raises(TensorBundleError, match='magic number'):
        TensorBundle(prefix)
    index.write_bytes(good_index[:20])
    with pytest.raises(TensorBundleError, match='too short'):
        TensorBundle(prefix)
    index.write_bytes(good_index)

    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(TensorBundleError, match='truncated download'):
        TensorBundle(prefix).read('filler/layer_399/weight')
    data.unlink()
    with pytest.raises(TensorBundleError, match='data file .* is missing'):
        TensorBundle(prefix).read('half')
    with pytest.raises(TensorBundleError, match='no TensorFlow checkpoint index'):
        TensorBundle(tmp_path / 'elsewhere')


def test_a_snappy_compressed_block_is_refused(tmp_path):
    prefix = copy_fixture(tmp_path)
    index = bytearray(Path(f'{prefix}.index').read_bytes())
    # the first data block starts at 0; its trailer's compression byte follows the block
    from tensorbundle import FOOTER_SIZE, block_entries, read_block, read_handle
    footer = bytes(index[-FOOTER_SIZE:])
    _, pos = read_handle(footer)
    index_handle, _ = read_handle(footer, pos)
    first_data_handle = read_handle(next(block_entries(read_block(bytes(index), index_handle, 'index')))[1])[0]
    index[first_data_handle[0] + first_data_handle[1]] = 1
    Path(f'{prefix}.index').write_bytes(bytes(index))
    with pytest.raises(TensorBundleError, match='snappy-compressed'):
        TensorBundle(prefix)


def test_our_test_writer_writes_what_tensorflow_reads_back_the_same(tmp_path):
    """The writer tests/test_moat.py builds official-layout checkpoints with, read back by our reader:
    the same tensors as went in (the format itself is checked on TensorFlow's own file above)."""
    tensors = {name: value.numpy() for name, value in read_tensor_bundle(TF_FIXTURE).items()
               if value.dtype != torch.bfloat16}
    write_tensor_bundle(str(tmp_path / 'copy'), tensors)
    again = read_tensor_bundle(tmp_path / 'copy')
    assert sorted(again) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(again[name].numpy(), value, err_msg=name)


# ---------------------------------------------------------------- the converter

def test_ema_copies_win_and_optimizer_slots_are_dropped():
    names = ['global_step', 'a/kernel', 'a/kernel/ExponentialMovingAverage', 'a/kernel/Adam', 'a/kernel/Adam_1',
             'b/moving_mean', 'c/bias/ExponentialMovingAverage', 'c/bias/Momentum']
    chosen, counts = convert_tool.tf_model_variables(names)
    assert chosen == {'global_step': 'global_step', 'a/kernel': 'a/kernel/ExponentialMovingAverage',
                      'b/moving_mean': 'b/moving_mean', 'c/bias': 'c/bias/ExponentialMovingAverage'}
    assert counts == {'variables': 4, 'ema': 2, 'left_out': 4}
    raw, counts = convert_tool.tf_model_variables(names, use_ema=False)
    # an EMA without its variable is the only copy there is
    assert raw == dict(chosen, **{'a/kernel': 'a/kernel'}) and counts == {'variables': 4, 'ema': 1, 'left_out': 4}


def test_format_detection(tmp_path):
    assert convert_tool.detect_format(str(TF_FIXTURE)) == 'tf'
    assert convert_tool.detect_format(f'{TF_FIXTURE}.index') == 'tf'
    path = tmp_path / 'weights.pth'
    torch.save({'x': torch.zeros(1)}, path)
    assert convert_tool.detect_format(str(path)) == 'torch'
    with pytest.raises(runtime.ToolError, match='neither a TensorFlow checkpoint'):
        convert_tool.detect_format(str(tmp_path / 'nothing'))


def test_torch_checkpoints_convert_through_the_family_filter(tmp_path):
    """The PyTorch path: an EMA-wrapped .pth of our own keys loads, and the file written is the model's."""
    model = timm.create_model('tiny_moat_0_no_pe', num_classes=3, depths=(1, 1, 1, 1))
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in model.state_dict().items()}
    torch.save({'state_dict': {k: torch.zeros_like(v) for k, v in state.items()}, 'state_dict_ema': state},
               tmp_path / 'official.pth')
    out = tmp_path / 'out.safetensors'
    convert_tool.main([str(tmp_path / 'official.pth'), '--model', 'tiny_moat_0_no_pe', '-o', str(out),
                       '--model-kwargs', 'num_classes=3', 'depths=(1,1,1,1)'])
    written = load_file(out)
    assert written.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(written[key], value, msg=key)
    convert_tool.main([str(tmp_path / 'official.pth'), '--model', 'tiny_moat_0_no_pe', '-o', str(out), '--no-ema',
                       '--model-kwargs', 'num_classes=3', 'depths=(1,1,1,1)'])
    assert all(not v.any() for k, v in load_file(out).items() if not k.endswith('num_batches_tracked'))


def test_mismatched_checkpoints_list_the_keys(tmp_path):
    save_file({'not_a_layer.weight': torch.zeros(2)}, str(tmp_path / 'bad.safetensors'))
    with pytest.raises(runtime.ToolError, match='not_a_layer'):
        convert_tool.main([str(tmp_path / 'bad.safetensors'), '--model', 'tiny_moat_0_no_pe',
                           '-o', str(tmp_path / 'out.safetensors')])
    with pytest.raises(runtime.ToolError, match='unknown model'):
        convert_tool.main([str(tmp_path / 'bad.safetensors'), '--model', 'tiny_moat_9',
                           '-o', str(tmp_path / 'out.safetensors')])


# ---------------------------------------------------------------- every family's official files

MOAT_VARIABLES = Path(__file__).resolve().parent / 'data' / 'moat_official' / 'tiny_moat_0_variables.json'


def _timm_layout(name):
    with torch.device('meta'):
        return timm.create_model(name).state_dict()


def _biformer_tiny():
    from test_biformer import official_state_dict
    return official_state_dict((64, 128, 256, 512), (2, 2, 8, 2))


def _dat_pp_tiny():
    from test_dat import OFFICIAL_SPEC, OFFICIAL_VARIANTS, official_state_dict
    dims, heads, groups, _ = OFFICIAL_VARIANTS['dat_pp_tiny']
    return official_state_dict(dims, OFFICIAL_SPEC, heads, groups)


def _transnext_micro():
    from test_transnext import OFFICIAL_ARCH, official_state_dict
    return official_state_dict(**OFFICIAL_ARCH['transnext_micro'])


# the smallest variant of every family -> its official file's state dict (the names and shapes the
# official code saves; values replaced below). MOAT's official files are TF checkpoints: _write_official.
OFFICIAL_STATE_DICTS = {
    'biformer_tiny': _biformer_tiny,
    'crossformer_tiny': lambda: crossformer_official_state_dict(**CROSSFORMER_OFFICIAL_ARCH['crossformer_tiny'],
                                                                device='meta'),
    'cswin_tiny_224': lambda: cswin_official_state_dict(**CSWIN_OFFICIAL_ARCH['cswin_tiny_224'], device='meta'),
    'dat_pp_tiny': _dat_pp_tiny,
    'litv2_small': lambda: litv2_official_state_dict(**LITV2_OFFICIAL_ARCH['litv2_small'], device='meta'),
    'nat_mini': lambda: nat_official_state_dict(**NAT_OFFICIAL_ARCH['nat_mini'], device='meta'),
    'transnext_micro': _transnext_micro,
    # timm-native: MaxViT's and HaloNet's released weights are timm's own files
    'maxvit_tiny_tf_224': lambda: _timm_layout('maxvit_tiny_tf_224'),
    'davit_tiny': lambda: to_official_layout('davit', _timm_layout('davit_tiny')),
    'shvit_s1': lambda: to_official_layout('shvit', _timm_layout('shvit_s1')),
    'halonet26t': lambda: _timm_layout('halonet26t'),
}
EVERY_FAMILY = sorted([*OFFICIAL_STATE_DICTS, 'tiny_moat_0'])


def test_every_supported_family_has_an_official_file_here():
    assert sorted(family_of(name) for name in EVERY_FAMILY) == sorted(supported_families())


def _constants(shapes: dict, sign: int = 1) -> dict:
    """Tensors of ``shapes``, each holding one value, its key's position (times ``sign``), that torch.save
    stores once: files of full-size variants that take no space, whose values say where each came from."""
    return {k: torch.tensor(sign * (i + 1), dtype=v.dtype).expand(v.shape) for i, (k, v) in enumerate(shapes.items())}


def _write_official(name, tmp_path, wrap='state_dict_and_ema'):
    """An official file of ``name`` in tmp_path: the EMA weights positive, the trained ones negative."""
    if name == 'tiny_moat_0':
        layout = json.loads(MOAT_VARIABLES.read_text())['tiny_moat0_pretrain_256_1k']
        tensors = {}
        for i, (variable, shape) in enumerate(layout.items()):
            tensors[variable] = np.full(shape, -(i + 1), np.float32)
            tensors[f'{variable}/ExponentialMovingAverage'] = np.full(shape, i + 1, np.float32)
        write_tensor_bundle(str(tmp_path / 'model.ckpt-1'), tensors)
        return tmp_path
    official = OFFICIAL_STATE_DICTS[name]()
    if wrap == 'state_dict_and_ema':
        checkpoint = {'state_dict': _constants(official, -1), 'state_dict_ema': _constants(official), 'epoch': 300}
    else:
        checkpoint = wrap_as_saved(_constants(official), wrap)
    path = tmp_path / f'{name}.pth.tar'
    torch.save(checkpoint, path)
    return path


def _convert(source, name, out, *args):
    convert_tool.main([str(source), '--model', name, '-o', str(out), *args])
    return load_file(out)


def _model_shapes(name):
    return {k: v.shape for k, v in convert_tool.build_on_meta(name).state_dict().items()}


def _assert_only_source_values(written, sign=1):
    """Every float value written is one the file held under its EMA (or, ``sign=-1``, trained) weights."""
    for key, value in written.items():
        if value.is_floating_point():
            assert (value * sign > 0).all(), key


# a timm-native family with an official layout of its own and MOAT's TF files run by default (about 2 s each),
# the others in the slow run (4 to 17 s each on 2 shared CPU cores, 2 minutes in all: full-size files and
# a real model each)
FAST_FAMILIES = ('shvit_s1', 'tiny_moat_0')


@pytest.mark.parametrize('name', [name if name in FAST_FAMILIES else pytest.param(name, marks=pytest.mark.slow)
                                  for name in EVERY_FAMILY])
def test_every_family_converts_its_official_file(tmp_path, name):
    """The smallest variant of each family, from a file laid out as the official code saves it (MOAT: TF;
    the others .pth.tar holding trained and EMA weights): the file written has exactly the model's keys
    and shapes and only the EMA values of the source, and pretrained_cfg_overlay=dict(file=...) gives the
    model exactly those tensors (BiFormer: through its own loader of the release files)."""
    out = tmp_path / 'out.safetensors'
    written = _convert(_write_official(name, tmp_path), name, out)
    assert {k: v.shape for k, v in written.items()} == _model_shapes(name)
    _assert_only_source_values(written)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, written[key]), key


@pytest.mark.parametrize('wrap, use_ema, sign', [
    *[(wrap, True, 1) for wrap in (*CHECKPOINT_WRAPS, 'model_ema')],
    ('state_dict_and_ema', True, 1), ('state_dict_and_ema', False, -1)])
def test_every_wrapper_and_the_dataparallel_prefix(tmp_path, wrap, use_ema, sign):
    """The files are read as the tool reads them: the weights (EMA first, unless --no-ema), without
    DataParallel's 'module.'."""
    official = {'patch_embed.0.c.weight': torch.empty(2, 3, 1, 1), 'head.l.bias': torch.empty(2)}
    if wrap == 'state_dict_and_ema':
        checkpoint = {'model': _constants(official, -1), 'model_ema': _constants(official), 'epoch': 3}
        torch.save(checkpoint, tmp_path / 'w.pth')
    else:
        torch.save(wrap_as_saved(_constants(official), wrap), tmp_path / 'w.pth')
    weights = checkpoints.read_state_dict(tmp_path / 'w.pth', use_ema=use_ema)
    assert weights.keys() == official.keys()
    _assert_only_source_values(weights, sign)


@pytest.mark.parametrize('source, model, named', [
    ('cswin_tiny_224', 'shvit_s1', r'looks like a cswin checkpoint, not one of shvit .*--model cswin_tiny_224'),
    ('cswin_tiny_224', 'cswin_small_224', r'another cswin variant: convert it with --model cswin_tiny_224'),
])
def test_a_file_of_another_family_or_variant_is_refused_naming_it(tmp_path, source, model, named):
    path = _write_official(source, tmp_path)
    with pytest.raises(runtime.ToolError, match=named) as err:
        convert_tool.main([str(path), '--model', model, '-o', str(tmp_path / 'out.safetensors')])
    assert 'missing keys' in str(err.value)
    assert not (tmp_path / 'out.safetensors').exists()


def test_a_classifier_of_another_size_is_named(tmp_path):
    official = OFFICIAL_STATE_DICTS['shvit_s1']()  # shvit_s1's last stage is 320 wide
    official['head.l.weight'], official['head.l.bias'] = torch.empty(10, 320), torch.empty(10)
    torch.save({'model': _constants(official)}, tmp_path / 'official.pth')
    out = tmp_path / 'out.safetensors'
    with pytest.raises(runtime.ToolError, match=r'(?s)head\.l\.weight: checkpoint \(10, 320\) vs model \(1000, 320\).*'
                                                r'layers fit shvit_s1; only its classifier differs.*num_classes=N'):
        convert_tool.main([str(tmp_path / 'official.pth'), '--model', 'shvit_s1', '-o', str(out)])
    written = _convert(tmp_path / 'official.pth', 'shvit_s1', out, '--model-kwargs', 'num_classes=10')
    assert written['head.l.weight'].shape == (10, 320)


@pytest.mark.slow  # about 55 s on 2 shared CPU cores (MaxViT's filter resizes every other variant's tables)
@pytest.mark.parametrize('name', EVERY_FAMILY)
def test_every_family_is_named_when_refused(tmp_path, name):
    """Each family's file, converted for a model of another family (NAT, or CSWin for NAT's file)."""
    other = 'cswin_tiny_224' if family_of(name) == 'nat' else 'nat_mini'
    with pytest.raises(runtime.ToolError, match=rf'looks like a {family_of(name)} checkpoint.*--model {name}\b'):
        convert_tool.main([str(_write_official(name, tmp_path)), '--model', other,
                           '-o', str(tmp_path / 'out.safetensors')])


class _RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_file_that_needs_pickled_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / 'ran'
    torch.save({'model': {'w': torch.zeros(1)}, 'hook': _RunsCode(marker)}, tmp_path / 'crafted.pth')
    with pytest.raises(runtime.ToolError, match=r'(?i)refused to load .*crafted\.pth.*unsupported global.*system'):
        convert_tool.main([str(tmp_path / 'crafted.pth'), '--model', 'shvit_s1',
                           '-o', str(tmp_path / 'out.safetensors')])
    assert not marker.exists()


def test_the_training_arguments_official_scripts_save_are_allowed_and_the_mapping_is_printed(tmp_path, capsys):
    path = _write_official('shvit_s1', tmp_path, 'model')
    checkpoint = torch.load(path, weights_only=True)
    torch.save(dict(checkpoint, args=argparse.Namespace(model='shvit_s1', lr=1e-3)), path)
    assert _convert(path, 'shvit_s1', tmp_path / 'out.safetensors').keys() == _model_shapes('shvit_s1').keys()
    printed = capsys.readouterr().out
    assert "471 tensors under 'model'" in printed
    # the stem and the classifier keep their names (24 + 7 tensors), the stages' are renamed
    assert '31 tensors kept their name, 440 renamed (blocks1.0.conv.m.c.weight -> stages.0.blocks.0.conv.m.c.weight' \
        in printed
    assert 'missing keys: none; unexpected keys: none; shape mismatches: none' in printed


def test_attnzoo_backbone_reads_an_official_file_as_convert_does(tmp_path):
    """heads/ loads a file through timm's loader (which allows the training arguments too and takes the EMA
    weights first, attnzoo's rule) and the family's filter: the same weights as tools/convert.py writes."""
    pytest.importorskip('mmengine', reason='OpenMMLab stack not installed: pip install "attnzoo[mm]"')
    from attnzoo.heads import AttnzooBackbone
    arch = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    official = nat_official_state_dict(**arch, mlp_ratio=3., layer_scale=None, device='meta')
    torch.save({'state_dict': _constants(official, -1), 'state_dict_ema': _constants(official),
                'args': argparse.Namespace(model='nat_mini')}, tmp_path / 'official.pth')
    backbone = AttnzooBackbone('nat_mini', checkpoint=str(tmp_path / 'official.pth'), out_indices=(0, 1, 2, 3), **arch)
    backbone.init_weights()  # where OpenMMLab backbones load their pretrained weights
    converted = _convert(tmp_path / 'official.pth', 'nat_mini', tmp_path / 'out.safetensors',
                         '--model-kwargs', *[f'{k}={v}'.replace(' ', '') for k, v in arch.items()])
    features = {k.removeprefix('model.'): v for k, v in backbone.features.state_dict().items()}  # timm's getter
    assert features.keys() <= converted.keys() and len(features) > 20
    for key, value in features.items():
        assert torch.equal(value, converted[key]), key


# ---------------------------------------------------------------- the one checkpoint path (backbones/_checkpoint.py)

def test_a_family_filter_names_a_mis_shaped_key_with_both_shapes():
    """The families' filters report shapes too, as the tools do: one report for every loader."""
    official = cswin_official_state_dict(**CSWIN_OFFICIAL_ARCH['cswin_tiny_224'], device='meta')
    official['stage3.0.mlp.fc1.weight'] = torch.empty(8, 256, device='meta')
    model = convert_tool.build_on_meta('cswin_tiny_224')
    with pytest.raises(CheckpointMismatchError, match=r'1 shape mismatches stages\.2\.blocks\.0\.mlp\.fc1\.weight: '
                                                      r'checkpoint \(8, 256\) vs model \(1024, 256\); .*variant'):
        checkpoint_filter_of('cswin_tiny_224')(official, model)


@pytest.mark.parametrize('checkpoint, message', [
    ([torch.zeros(1)], 'not a list'),
    ({'epoch': 3, 'weights': {'w': torch.zeros(1)}},
     r"entries \['epoch', 'weights'\] are not tensors\) and holds none under .*'model'"),
])
def test_what_is_not_a_state_dict_is_named(checkpoint, message):
    with pytest.raises(CheckpointError, match=message):
        unwrap_checkpoint(checkpoint)


def test_the_preference_is_ema_then_trained_and_prefixes_go():
    weights = {name: {'module._orig_mod.w': torch.tensor(float(i))} for i, name in enumerate(
        ('model', 'state_dict', 'model_ema', 'state_dict_ema'))}
    assert unwrap_checkpoint(weights) == {'w': torch.tensor(3.)}
    assert unwrap_checkpoint(weights, use_ema=False) == {'w': torch.tensor(1.)}
    del weights['state_dict_ema'], weights['state_dict']
    assert unwrap_checkpoint(weights) == {'w': torch.tensor(2.)}
    assert unwrap_checkpoint(weights, use_ema=False) == {'w': torch.tensor(0.)}


# ---------------------------------------------------------------- verifying a file before it is read

def _official_file_with_a_real_tensor(tmp_path):
    """shvit_s1's official file whose largest tensor holds random values (a record of its own, 1.5 MB); and
    that tensor's name."""
    official = _constants(OFFICIAL_STATE_DICTS['shvit_s1']())
    largest = max(official, key=lambda k: official[k].numel())
    official[largest] = torch.randn(official[largest].shape)
    path = tmp_path / 'shvit_s1.pth'
    torch.save({'model': official}, path)
    return path, largest


def _record_data_offset(path, name_suffix):
    """Where the data of the zip record whose name ends with ``name_suffix`` starts in the file."""
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith(name_suffix))
    header = path.read_bytes()[record.header_offset:record.header_offset + 30]
    name_length, extra_length = int.from_bytes(header[26:28], 'little'), int.from_bytes(header[28:30], 'little')
    return record.header_offset + 30 + name_length + extra_length, record.file_size


def test_flipped_bytes_in_a_torch_file_are_refused_naming_the_record(tmp_path):
    """torch.load does not check the zip records' CRC-32: 4 KB of flipped bytes would load as 1,024 changed weights."""
    path, largest = _official_file_with_a_real_tensor(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    storage = next(i for i, k in enumerate(checkpoint['model']) if k == largest)  # torch.save numbers storages in order
    offset, size = _record_data_offset(path, f'/data/{storage}')
    assert size == 4 * checkpoint['model'][largest].numel()
    data = bytearray(path.read_bytes())
    data[offset + 8192:offset + 12288] = bytes(b ^ 0xff for b in data[offset + 8192:offset + 12288])
    path.write_bytes(data)
    assert (torch.load(path, weights_only=True)['model'][largest] != checkpoint['model'][largest]).sum() == 1024
    with pytest.raises(runtime.ToolError, match=rf'damaged: the CRC-32 check fails for 1 of its \d+ zip records '
                                                rf'\(shvit_s1/data/{storage}\)'):
        _convert(path, 'shvit_s1', tmp_path / 'out.safetensors')
    assert not (tmp_path / 'out.safetensors').exists()


@pytest.mark.parametrize('damage, message', [
    ('truncated', r'header describes \d+ bytes of tensor data, the file holds \d+ \(truncated\)'),
    ('shape', r'damaged safetensors header: w \(4096 bytes for F32 \[1023\], which take 4092\)'),
    ('header', r'too short for the header its first bytes announce'),
])
def test_a_damaged_safetensors_file_is_refused_saying_what_is_wrong(tmp_path, damage, message):
    path = tmp_path / 'weights.safetensors'
    save_file({'w': torch.randn(1024), 'v': torch.randn(3)}, str(path))
    data = path.read_bytes()
    if damage == 'truncated':
        data = data[:-100]
    elif damage == 'shape':
        data = data.replace(b'[1024]', b'[1023]')  # the header keeps its length
    else:
        data = (10 ** 9).to_bytes(8, 'little') + data[8:]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_file(path)
    with pytest.raises(runtime.ToolError, match=message):
        checkpoints.read_state_dict(path)


def test_an_empty_file_says_it_is_empty(tmp_path):
    """torch.load raises EOFError with no message for it (the tools' own handler failed on that)."""
    for suffix in ('.pth', '.safetensors'):
        (tmp_path / f'empty{suffix}').touch()
        with pytest.raises(runtime.ToolError, match=rf'empty{suffix} is empty \(0 bytes\): .*again'):
            _convert(tmp_path / f'empty{suffix}', 'shvit_s1', tmp_path / 'out.safetensors')
    with pytest.raises(runtime.ToolError, match=r'empty\.safetensors is empty'):  # a training run's own file
        checkpoints.read_safetensors(tmp_path / 'empty.safetensors')


def test_a_file_holding_non_finite_values_is_refused_naming_the_tensors(tmp_path):
    path = _write_official('shvit_s1', tmp_path, 'model')
    checkpoint = torch.load(path, weights_only=True)
    names = list(checkpoint['model'])[3:5]
    for name, value in zip(names, (float('nan'), float('-inf'))):
        checkpoint['model'][name] = checkpoint['model'][name].clone().index_fill_(0, torch.tensor([0]), value)
    torch.save(checkpoint, path)
    with pytest.raises(runtime.ToolError, match=rf'holds non-finite values \(NaN or Inf\) in 2 tensors: '
                                                rf'model\.{names[0]}, model\.{names[1]}\. .*earlier checkpoint'):
        _convert(path, 'shvit_s1', tmp_path / 'out.safetensors')


def test_a_legacy_torch_file_loads_with_a_warning_that_it_cannot_be_checked(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save({'model': {'w': torch.ones(2)}}, path, _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match=r"legacy \(pre-1\.6, non-zip\) format, which has no checksums"):
        assert torch.equal(load_checkpoint_file(path)['model']['w'], torch.ones(2))
    path.write_bytes(b'<html>Quota exceeded</html>')
    with pytest.raises(CheckpointError, match='neither a zip archive .* nor PyTorch\'s legacy format'):
        load_checkpoint_file(path)


def test_convert_writes_the_sha256_of_what_it_wrote(tmp_path, capsys):
    out = tmp_path / 'out.safetensors'
    _convert(_write_official('shvit_s1', tmp_path), 'shvit_s1', out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert (tmp_path / 'out.safetensors.sha256').read_text() == f'{digest}  out.safetensors\n'
    assert f'SHA-256 {digest}' in capsys.readouterr().out
    assert subprocess.run(['sha256sum', '-c', 'out.safetensors.sha256'], cwd=tmp_path).returncode == 0
