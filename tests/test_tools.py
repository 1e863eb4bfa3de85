"""tools/train.py and tools/eval.py on timm's tiny ``test_vit`` and the embedded digits dataset.

The tools run in-process (their ``main(argv)``), except the two-process torchrun run and one
command-line error check. Every training run is capped at a few steps.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
sys.path.insert(0, str(TOOLS))
import _common as common  # noqa: E402


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f'attnzoo_tools_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tool = _load_tool('train')
eval_tool = _load_tool('eval')

MODEL = 'test_vit'
IMG_SIZE = 16
BATCH = 16
TINY = ['--model', MODEL, '--img-size', str(IMG_SIZE), '--batch-size', str(BATCH), '--device', 'cpu']
RUN = TINY + ['--epochs', '2', '--max-steps-per-epoch', '3', '--ema', '--drop-path', '0.1']  # drop path: random state matters


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The shapes are tiny: a second thread only adds a wait per op (long on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """An uninterrupted two-epoch run with EMA; the tests below only read it."""
    out = tmp_path_factory.mktemp('runs') / 'digits'
    train_tool.main(RUN + ['--output', str(out)])
    return out


def _tensors(path):
    return load_file(str(path))


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_every_epoch_leaves_a_complete_checkpoint(run_dir):
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted([common.MODEL_FILE, common.EMA_FILE, common.OPTIMIZER_FILE, common.STATE_FILE])  # no temp files
    state = json.loads((run_dir / common.STATE_FILE).read_text())
    assert (state['epoch'], state['step']) == (2, 6)
    assert [h['epoch'] for h in state['history']] == [1, 2]
    model = timm.create_model(MODEL, num_classes=10)
    model.load_state_dict(_tensors(run_dir / common.MODEL_FILE), strict=True)
    model.load_state_dict(_tensors(run_dir / common.EMA_FILE), strict=True)
    optimizer_state = _tensors(run_dir / common.OPTIMIZER_FILE)
    assert len(optimizer_state) == 3 * len(list(model.parameters()))  # step, exp_avg, exp_avg_sq
    assert all(v.item() == 6 for k, v in optimizer_state.items() if k.endswith('.step'))


class _Killed(Exception):
    pass


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(run_dir, tmp_path, monkeypatch):
    out = tmp_path / 'killed'
    save = train_tool.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise _Killed

    monkeypatch.setattr(train_tool, 'save_checkpoint', save_then_die)
    with pytest.raises(_Killed):
        train_tool.main(RUN + ['--output', str(out)])
    monkeypatch.undo()
    assert json.loads((out / common.STATE_FILE).read_text())['epoch'] == 1

    torch.manual_seed(1234)  # a resumed process starts with other random state
    train_tool.main(['--resume', str(out), '--device', 'cpu'])
    for name in (common.MODEL_FILE, common.EMA_FILE, common.OPTIMIZER_FILE):
        _assert_same_tensors(_tensors(out / name), _tensors(run_dir / name))
    resumed = json.loads((out / common.STATE_FILE).read_text())
    straight = json.loads((run_dir / common.STATE_FILE).read_text())
    assert resumed['history'] == straight['history']
    assert resumed['optimizer_param_groups'] == straight['optimizer_param_groups']


def test_resume_keeps_the_run_unchanged(run_dir):
    with pytest.raises(common.ToolError, match='--epochs 5 differs'):
        train_tool.main(['--resume', str(run_dir), '--epochs', '5'])
    with pytest.raises(common.ToolError, match='already holds a training run'):
        train_tool.main(RUN + ['--output', str(run_dir)])


def test_resume_refuses_a_checkpoint_torn_by_a_kill(run_dir, tmp_path):
    torn = tmp_path / 'torn'
    shutil.copytree(run_dir, torn)
    # the model file of a later save landed, the state file of that save did not
    (torn / common.MODEL_FILE).write_bytes(common.tensors_to_bytes(_tensors(run_dir / common.MODEL_FILE), step=9))
    with pytest.raises(common.ToolError, match='killed while writing'):
        train_tool.main(['--resume', str(torn), '--device', 'cpu'])


def _direct_top1(weights):
    """Top-1 on the digits validation split computed without the tools' data and eval code."""
    model = timm.create_model(MODEL, num_classes=10).eval()
    model.load_state_dict(weights)
    pixels, labels = load_digits(return_X_y=True)
    _, val = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    images = torch.tensor(pixels[val], dtype=torch.float32).view(-1, 1, 8, 8) / 16
    images = F.interpolate(images, size=(IMG_SIZE, IMG_SIZE), mode='bilinear').expand(-1, 3, -1, -1)
    mean = torch.tensor(model.pretrained_cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg['std']).view(1, 3, 1, 1)
    images = (images - mean) / std
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(128)])
    return 100.0 * (predictions.numpy() == labels[val]).mean()


@pytest.mark.parametrize('weights, history_key', [(common.MODEL_FILE, 'val_top1'), (common.EMA_FILE, 'ema_val_top1')])
def test_eval_top1_matches_a_direct_computation(run_dir, tmp_path, weights, history_key):
    report = tmp_path / 'metrics.json'
    # no --img-size: the run's train_state.json beside the weights gives it
    argv = ['--model', MODEL, '--device', 'cpu', '--checkpoint', str(run_dir / weights), '--json', str(report)]
    metrics = eval_tool.main(argv)
    expected = _direct_top1(_tensors(run_dir / weights))
    assert metrics['num_images'] == 360 and metrics['input_size'] == [3, IMG_SIZE, IMG_SIZE]
    assert metrics['top1'] == pytest.approx(expected, abs=1e-9)
    assert metrics['top1'] == pytest.approx(json.loads((run_dir / common.STATE_FILE).read_text())['history'][-1][history_key])
    assert json.loads(report.read_text())['top1'] == metrics['top1']


@pytest.mark.parametrize('wrap', ['openclip_prefix', 'ddp_prefix_in_model_key'])
def test_eval_of_an_official_layout_checkpoint(run_dir, tmp_path, wrap):
    weights = _tensors(run_dir / common.MODEL_FILE)
    if wrap == 'openclip_prefix':  # only vision_transformer.checkpoint_filter_fn knows this layout
        checkpoint = {'state_dict': {f'visual.trunk.{k}': v for k, v in weights.items()}, 'epoch': 300}
    else:
        checkpoint = {'model': {f'module.{k}': v for k, v in weights.items()}}
    path = tmp_path / 'official.pth'
    torch.save(checkpoint, path)
    metrics = eval_tool.main(TINY + ['--checkpoint', str(path)])
    trained = json.loads((run_dir / common.STATE_FILE).read_text())['history'][-1]
    assert (metrics['top1'], metrics['top5']) == pytest.approx((trained['val_top1'], trained['val_top5']))


def test_training_can_start_from_an_official_checkpoint_of_another_head(tmp_path):
    official = timm.create_model(MODEL).state_dict()  # an ImageNet-1k head
    path = tmp_path / 'official.pth'
    torch.save({'state_dict': official}, path)
    model = common.create_model(MODEL, num_classes=10, pretrained_file=str(path))
    loaded = model.state_dict()
    assert loaded['head.weight'].shape == (10, 64)
    _assert_same_tensors({k: v for k, v in loaded.items() if not k.startswith('head.')},
                         {k: v for k, v in official.items() if not k.startswith('head.')})


def test_a_checkpoint_that_does_not_fit_lists_the_keys(run_dir):
    weights = _tensors(run_dir / common.MODEL_FILE)
    weights['blocks.9.extra.weight'] = weights.pop('norm.weight')
    model = common.create_model(MODEL, num_classes=10)
    with pytest.raises(common.ToolError) as err:
        common.load_weights(model, weights, 'ckpt')
    assert 'missing keys (1): norm.weight' in str(err.value)
    assert 'unexpected keys (1): blocks.9.extra.weight' in str(err.value)
    with pytest.raises(common.ToolError, match=r'head.weight: checkpoint \(10, 64\) vs model \(7, 64\)'):
        common.load_weights(common.create_model(MODEL, num_classes=7), _tensors(run_dir / common.MODEL_FILE), 'ckpt')


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_a_corrupt_checkpoint_is_a_clear_error(run_dir, tmp_path, damage, suffix):
    good = tmp_path / f'good{suffix}'
    if suffix == '.safetensors':
        shutil.copy(run_dir / common.MODEL_FILE, good)
    else:
        torch.save({'state_dict': _tensors(run_dir / common.MODEL_FILE)}, good)
    data = good.read_bytes()
    bad = tmp_path / f'bad{suffix}'
    bad.write_bytes(os.urandom(4096) if damage == 'garbage' else data[: len(data) // 2])
    with pytest.raises(common.ToolError, match='cannot read checkpoint .*truncated, corrupt'):
        common.read_state_dict(bad)


def test_the_command_line_reports_errors_without_a_traceback(tmp_path):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'not a checkpoint')
    result = subprocess.run([sys.executable, str(TOOLS / 'eval.py'), *TINY, '--checkpoint', str(bad)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 1
    assert result.stderr.startswith('error: cannot read checkpoint'), result.stderr
    assert 'Traceback' not in result.stderr


def test_an_unknown_model_name_suggests_close_ones():
    with pytest.raises(common.ToolError, match="unknown model 'test_vitt'.*Close names: .*test_vit"):
        common.create_model('test_vitt', num_classes=10)


def test_amp_training_step_on_cpu(tmp_path):
    out = tmp_path / 'amp'
    metrics = train_tool.main(TINY + ['--epochs', '1', '--max-steps-per-epoch', '2', '--amp', '--output', str(out)])
    assert np.isfinite(metrics['train_loss'])
    common.seed_everything(0)  # the run's --seed: the same initial weights
    initial = common.create_model(MODEL, num_classes=10)
    trained = _tensors(out / common.MODEL_FILE)
    assert not torch.equal(trained['head.weight'], initial.state_dict()['head.weight'])


def test_image_folder_dataset(tmp_path):
    root = tmp_path / 'folder'
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for cls in ('cat', 'dog'):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / split / cls / f'{i}.png')
    out = tmp_path / 'run'
    args = ['--model', MODEL, '--img-size', str(IMG_SIZE), '--batch-size', '4', '--device', 'cpu', '--dataset', str(root)]
    trained = train_tool.main(args + ['--epochs', '1', '--output', str(out)])
    evaluated = eval_tool.main(args + ['--checkpoint', str(out / common.MODEL_FILE)])
    assert evaluated['num_images'] == 8
    assert evaluated['top1'] == pytest.approx(trained['val_top1'])
    (root / 'val' / 'bird').mkdir()
    with pytest.raises(common.ToolError, match='different classes'):
        train_tool.main(args + ['--output', str(tmp_path / 'run2')])


def _run_process_group(command, env, timeout):
    """Runs ``command`` in its own session; on timeout kills it with every process it started."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f'{command} ran past {timeout} s:\n{stderr[-3000:]}')
    return process.returncode, stderr


def test_two_process_torchrun_equals_one_process_with_the_combined_batch(tmp_path):
    """DDP averages gradients over ranks, whose shards of a batch make up the one-process batch."""
    steps = ['--epochs', '1', '--max-steps-per-epoch', '2', '--warmup-epochs', '0']
    common_args = ['--model', MODEL, '--img-size', str(IMG_SIZE), '--device', 'cpu'] + steps
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               str(TOOLS / 'train.py'), *common_args, '--batch-size', str(BATCH // 2), '--output', str(tmp_path / 'ddp')]
    returncode, stderr = _run_process_group(command, dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert returncode == 0, stderr[-3000:]
    train_tool.main(common_args + ['--batch-size', str(BATCH), '--output', str(tmp_path / 'single')])
    ddp = _tensors(tmp_path / 'ddp' / common.MODEL_FILE)
    single = _tensors(tmp_path / 'single' / common.MODEL_FILE)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    ddp_state = json.loads((tmp_path / 'ddp' / common.STATE_FILE).read_text())
    assert ddp_state['args']['batch_size'] == BATCH // 2 and ddp_state['history'][0]['val_num_images'] == 360
