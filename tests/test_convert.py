"""tools/tensorbundle.py (TensorFlow checkpoints without TensorFlow) and tools/convert.py.

The reader is checked against a checkpoint TensorFlow itself wrote (tests/data/tf_checkpoint, made by its
make_checkpoint.py, whose values are re-derived here) and against damaged copies of it. The converter's
MOAT path (official variable names and layouts) is tested in tests/test_moat.py.
"""
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from tf_checkpoints import write_tensor_bundle

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
sys.path.insert(0, str(TOOLS))
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
        convert_tool.main([str(tmp_path / 'bad.safetensors'), '--model', 'tiny_moat_9', '-o', str(tmp_path / 'out.safetensors')])
