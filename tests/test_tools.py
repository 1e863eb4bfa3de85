"""tools/train.py and tools/eval.py on timm's tiny ``test_vit`` (and small CSWin / NAT models for
official checkpoints) and the embedded digits dataset.

The tools run in-process (their ``main(argv)``), except the two-process torchrun runs (killed, then
resumed) and one command-line error check. Every training run is capped at a few steps.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils._python_dispatch import TorchDispatchMode

from official_checkpoints import cswin_official_state_dict, nat_official_state_dict, to_official_layout

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
sys.path.insert(0, str(TOOLS))
import _checkpoints as checkpoints  # noqa: E402
import _evaluation as evaluation  # noqa: E402
import _models as models  # noqa: E402
import _runtime as runtime  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny shapes (conftest.py)


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


class _RecordingLoader:
    """A training loader that notes the labels of every batch it yields (the data order)."""

    def __init__(self, loader, batches):
        self.loader, self.batches = loader, batches

    def __iter__(self):
        for images, labels in self.loader:
            self.batches.append(labels.tolist())
            yield images, labels

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def record_batches(monkeypatch) -> list:
    """From now on, each epoch of tools/train.py appends the label lists of its batches to the returned list."""
    epochs = []
    train_one_epoch = train_tool.train_one_epoch

    def recording(model, ema, loader, *args, **kwargs):
        epochs.append([])
        return train_one_epoch(model, ema, _RecordingLoader(loader, epochs[-1]), *args, **kwargs)

    monkeypatch.setattr(train_tool, 'train_one_epoch', recording)
    return epochs


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
    """An uninterrupted two-epoch run with EMA, and the batches each epoch saw; the tests below only read it."""
    out = tmp_path_factory.mktemp('runs') / 'digits'
    with pytest.MonkeyPatch.context() as monkeypatch:
        batches = record_batches(monkeypatch)
        train_tool.main(RUN + ['--output', str(out)])
    return out, batches


@pytest.fixture(scope='module')
def run_dir(straight_run):
    return straight_run[0]


def _tensors(path):
    return load_file(str(path))


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_every_epoch_leaves_a_complete_checkpoint(run_dir):
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted([checkpoints.MODEL_FILE, checkpoints.EMA_FILE, checkpoints.OPTIMIZER_FILE, checkpoints.STATE_FILE])  # no temp files
    state = json.loads((run_dir / checkpoints.STATE_FILE).read_text())
    assert (state['epoch'], state['step']) == (2, 6)
    assert [h['epoch'] for h in state['history']] == [1, 2]
    model = timm.create_model(MODEL, num_classes=10)
    model.load_state_dict(_tensors(run_dir / checkpoints.MODEL_FILE), strict=True)
    model.load_state_dict(_tensors(run_dir / checkpoints.EMA_FILE), strict=True)
    optimizer_state = _tensors(run_dir / checkpoints.OPTIMIZER_FILE)
    assert len(optimizer_state) == 3 * len(list(model.parameters()))  # step, exp_avg, exp_avg_sq
    assert all(v.item() == 6 for k, v in optimizer_state.items() if k.endswith('.step'))


def test_every_epoch_reshuffles(straight_run):
    _, batches = straight_run
    assert [len(epoch) for epoch in batches] == [3, 3]
    assert batches[0] != batches[1]


class _Killed(Exception):
    pass


def train_until_killed(argv, monkeypatch):
    """tools/train.py with ``argv``, killed right after its first checkpoint was written."""
    save = train_tool.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(train_tool, 'save_checkpoint', save_then_die)
        with pytest.raises(_Killed):
            train_tool.main(argv)


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(straight_run, tmp_path, monkeypatch):
    run_dir, straight_batches = straight_run
    out = tmp_path / 'killed'
    batches = record_batches(monkeypatch)
    train_until_killed(RUN + ['--output', str(out)], monkeypatch)
    assert json.loads((out / checkpoints.STATE_FILE).read_text())['epoch'] == 1

    torch.manual_seed(1234)  # a resumed process starts with other random state
    train_tool.main(['--resume', str(out), '--device', 'cpu'])
    assert batches == straight_batches  # the resumed epoch sees the second epoch's order, not the first's
    for name in (checkpoints.MODEL_FILE, checkpoints.EMA_FILE, checkpoints.OPTIMIZER_FILE):
        _assert_same_tensors(_tensors(out / name), _tensors(run_dir / name))
    resumed = json.loads((out / checkpoints.STATE_FILE).read_text())
    straight = json.loads((run_dir / checkpoints.STATE_FILE).read_text())
    assert resumed['history'] == straight['history']
    assert resumed['optimizer_param_groups'] == straight['optimizer_param_groups']


def test_resume_with_a_float16_grad_scaler(tmp_path, monkeypatch):
    """The scaler's state (scale, steps since the last overflow) carries over a kill, as the weights do."""
    # validation adds nothing here and float16 is slow on a CPU
    monkeypatch.setattr(evaluation, 'evaluate', lambda *args, **kwargs: {'top1': 0., 'top5': 0., 'num_images': 0})
    run = TINY + ['--epochs', '2', '--max-steps-per-epoch', '1', '--amp', '--amp-dtype', 'float16']
    train_tool.main(run + ['--output', str(tmp_path / 'straight')])
    train_until_killed(run + ['--output', str(tmp_path / 'killed')], monkeypatch)
    train_tool.main(['--resume', str(tmp_path / 'killed'), '--device', 'cpu'])
    straight = json.loads((tmp_path / 'straight' / checkpoints.STATE_FILE).read_text())
    resumed = json.loads((tmp_path / 'killed' / checkpoints.STATE_FILE).read_text())
    assert straight['grad_scaler'] is not None and straight['grad_scaler']['_growth_tracker'] > 0
    assert resumed['grad_scaler'] == straight['grad_scaler']
    for name in (checkpoints.MODEL_FILE, checkpoints.OPTIMIZER_FILE):
        _assert_same_tensors(_tensors(tmp_path / 'killed' / name), _tensors(tmp_path / 'straight' / name))


def test_resume_keeps_the_run_unchanged(run_dir):
    with pytest.raises(runtime.ToolError, match='--epochs 5 differs'):
        train_tool.main(['--resume', str(run_dir), '--epochs', '5'])
    with pytest.raises(runtime.ToolError, match='already holds a training run'):
        train_tool.main(RUN + ['--output', str(run_dir)])


def test_resume_refuses_a_checkpoint_torn_by_a_kill(run_dir, tmp_path):
    torn = tmp_path / 'torn'
    shutil.copytree(run_dir, torn)
    state = json.loads((torn / checkpoints.STATE_FILE).read_text())
    state['args']['epochs'] = 3  # a run with an epoch to go
    (torn / checkpoints.STATE_FILE).write_text(json.dumps(state))
    # the model file of a later save landed, the state file of that save did not
    (torn / checkpoints.MODEL_FILE).write_bytes(checkpoints.tensors_to_bytes(_tensors(run_dir / checkpoints.MODEL_FILE), step=9))
    with pytest.raises(runtime.ToolError, match='killed while writing'):
        train_tool.main(['--resume', str(torn), '--device', 'cpu'])


def _direct_top1(weights, name=MODEL, img_size=IMG_SIZE, **model_kwargs):
    """Top-1 on the digits validation split computed without the tools' data and eval code."""
    model = timm.create_model(name, num_classes=10, **model_kwargs).eval()
    model.load_state_dict(weights)
    pixels, labels = load_digits(return_X_y=True)
    _, val = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    images = torch.tensor(pixels[val], dtype=torch.float32).view(-1, 1, 8, 8) / 16
    images = F.interpolate(images, size=(img_size, img_size), mode='bilinear').expand(-1, 3, -1, -1)
    mean = torch.tensor(model.pretrained_cfg['mean']).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg['std']).view(1, 3, 1, 1)
    images = (images - mean) / std
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(128)])
    return 100.0 * (predictions.numpy() == labels[val]).mean()


@pytest.mark.parametrize('weights, history_key', [(checkpoints.MODEL_FILE, 'val_top1'), (checkpoints.EMA_FILE, 'ema_val_top1')])
def test_eval_top1_matches_a_direct_computation(run_dir, tmp_path, weights, history_key):
    report = tmp_path / 'metrics.json'
    # no --img-size: the run's train_state.json beside the weights gives it
    argv = ['--model', MODEL, '--device', 'cpu', '--checkpoint', str(run_dir / weights), '--json', str(report)]
    metrics = eval_tool.main(argv)
    expected = _direct_top1(_tensors(run_dir / weights))
    assert metrics['num_images'] == 360 and metrics['input_size'] == [3, IMG_SIZE, IMG_SIZE]
    assert metrics['top1'] == pytest.approx(expected, abs=1e-9)
    assert metrics['top1'] == pytest.approx(json.loads((run_dir / checkpoints.STATE_FILE).read_text())['history'][-1][history_key])
    assert json.loads(report.read_text())['top1'] == metrics['top1']


# small models of the two families with official checkpoints, and their official key sets
OFFICIAL_LAYOUT_MODELS = {
    'cswin': ('cswin_tiny_224', dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4)),
              lambda: cswin_official_state_dict(16, (1, 1, 1, 1), num_classes=10, device='meta')),
    'nat': ('nat_small', dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), kernel_size=3),  # LayerScale
            lambda: nat_official_state_dict(32, (1, 1, 1, 1), (2, 2, 2, 2), mlp_ratio=2., layer_scale=1e-5,
                                            kernel_size=3, num_classes=10, device='meta')),
}


@pytest.mark.parametrize('family, ema', [('cswin', False), ('cswin', True), ('nat', False)])
def test_eval_of_an_official_layout_checkpoint(tmp_path, monkeypatch, family, ema):
    """An official file evaluates with exactly the weights it holds: CSWin's as its training script saves
    it (weights and EMA weights, DataParallel names; the EMA ones unless --no-ema), NAT's a plain state dict."""
    name, arch, official_keys = OFFICIAL_LAYOUT_MODELS[family]
    torch.manual_seed(0)
    wanted, other = (timm.create_model(name, num_classes=10, **arch).state_dict() for _ in range(2))
    official = to_official_layout(family, wanted)
    assert official.keys() == official_keys().keys()
    if family == 'cswin':
        weights, ema_weights = (to_official_layout(family, other), official) if ema else (official, to_official_layout(family, other))
        checkpoint = {'state_dict': {f'module.{k}': v for k, v in weights.items()},
                      'state_dict_ema': {f'module.{k}': v for k, v in ema_weights.items()}, 'epoch': 300}
    else:
        checkpoint = official
    path = tmp_path / 'official.pth'
    torch.save(checkpoint, path)

    loaded = {}
    load_weights = checkpoints.load_weights

    def load_and_keep(model, state_dict, source):
        load_weights(model, state_dict, source)
        loaded.update(model.state_dict())

    monkeypatch.setattr(checkpoints, 'load_weights', load_and_keep)
    kwargs = [f'{k}={v!r}'.replace(' ', '') for k, v in arch.items()]
    metrics = eval_tool.main(['--model', name, '--img-size', '32', '--device', 'cpu', '--checkpoint', str(path),
                              '--model-kwargs', *kwargs] + ([] if ema else ['--no-ema']))
    _assert_same_tensors(loaded, wanted)
    assert metrics['top1'] == pytest.approx(_direct_top1(wanted, name, 32, **arch), abs=1e-9)


def test_training_can_start_from_an_official_checkpoint_of_another_head(tmp_path):
    official = timm.create_model(MODEL).state_dict()  # an ImageNet-1k head
    path = tmp_path / 'official.pth'
    torch.save({'state_dict': official}, path)
    model = models.create_model(MODEL, num_classes=10, pretrained_file=str(path))
    loaded = model.state_dict()
    assert loaded['head.weight'].shape == (10, 64)
    _assert_same_tensors({k: v for k, v in loaded.items() if not k.startswith('head.')},
                         {k: v for k, v in official.items() if not k.startswith('head.')})


def test_a_checkpoint_that_does_not_fit_lists_the_keys(run_dir):
    weights = _tensors(run_dir / checkpoints.MODEL_FILE)
    weights['blocks.9.extra.weight'] = weights.pop('norm.weight')
    model = models.create_model(MODEL, num_classes=10)
    with pytest.raises(runtime.ToolError) as err:
        checkpoints.load_weights(model, weights, 'ckpt')
    assert '1 missing keys (in the model, not in the checkpoint) norm.weight' in str(err.value)
    assert '1 unexpected keys (in the checkpoint, not in the model) blocks.9.extra.weight' in str(err.value)
    with pytest.raises(runtime.ToolError, match=r'head.weight: checkpoint \(10, 64\) vs model \(7, 64\)'):
        checkpoints.load_weights(models.create_model(MODEL, num_classes=7), _tensors(run_dir / checkpoints.MODEL_FILE), 'ckpt')


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_a_corrupt_checkpoint_is_a_clear_error(run_dir, tmp_path, damage, suffix):
    good = tmp_path / f'good{suffix}'
    if suffix == '.safetensors':
        shutil.copy(run_dir / checkpoints.MODEL_FILE, good)
    else:
        torch.save({'state_dict': _tensors(run_dir / checkpoints.MODEL_FILE)}, good)
    data = good.read_bytes()
    bad = tmp_path / f'bad{suffix}'
    bad.write_bytes(os.urandom(4096) if damage == 'garbage' else data[: len(data) // 2])
    with pytest.raises(runtime.ToolError, match=r'bad\.(pth|safetensors) (is|has) (a )?(damaged|truncated|not a (complete|checkpoint)).*again'):
        checkpoints.read_state_dict(bad)


def test_the_command_line_reports_errors_without_a_traceback(tmp_path):
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'not a checkpoint')
    result = subprocess.run([sys.executable, str(TOOLS / 'eval.py'), *TINY, '--checkpoint', str(bad)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 1
    assert result.stderr.startswith(f'error: {bad} is not a complete safetensors file'), result.stderr
    assert result.stderr.count('\n') == 1  # one line: what is wrong and what to do
    assert 'Traceback' not in result.stderr


def test_an_unknown_model_name_suggests_close_ones():
    with pytest.raises(runtime.ToolError, match="unknown model 'test_vitt'.*Close names: .*test_vit"):
        models.create_model('test_vitt', num_classes=10)


# ---------------------------------------------------------------- non-finite values (issue 25, item 2)

class _PoisoningLoader(_RecordingLoader):
    """A training loader whose batches number ``poisoned`` (counted over the whole run, from 1) carry one NaN pixel."""

    def __init__(self, loader, counter, poisoned):
        super().__init__(loader, [])
        self.counter, self.poisoned = counter, poisoned

    def __iter__(self):
        for images, labels in self.loader:
            self.counter.append(None)
            if len(self.counter) in self.poisoned:
                images = images.clone()
                images[0, 0, 0, 0] = float('nan')
            yield images, labels


def poison_batches(monkeypatch, poisoned) -> None:
    train_one_epoch, counter = train_tool.train_one_epoch, []

    def poisoning(model, ema, loader, *args, **kwargs):
        return train_one_epoch(model, ema, _PoisoningLoader(loader, counter, poisoned), *args, **kwargs)

    monkeypatch.setattr(train_tool, 'train_one_epoch', poisoning)


def test_a_diverging_run_stops_naming_the_step_and_saves_nothing(tmp_path):
    """The issue's repro on test_vit: with --lr 1e6 the loss is NaN at the second step."""
    out = tmp_path / 'diverged'
    with pytest.raises(runtime.ToolError, match=r'the training loss is nan at step 2 \(epoch 1\): the run diverged and '
                                                r'stopped; no epoch finished, nothing was saved\. Try a lower --lr \(now '
                                                r'1e\+06\), a longer --warmup-epochs \(now 0\), --clip-grad 1\.0'):
        train_tool.main(TINY + ['--epochs', '1', '--max-steps-per-epoch', '6', '--lr', '1e6', '--warmup-epochs', '0',
                                '--output', str(out)])
    assert not (out / checkpoints.MODEL_FILE).exists()


def test_a_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / 'run'
    poison_batches(monkeypatch, poisoned={4})  # the first batch of the second epoch
    saved = {}
    save = train_tool.save_checkpoint

    def save_and_copy(*args, **kwargs):
        save(*args, **kwargs)
        saved.update({p.name: p.read_bytes() for p in out.iterdir()})

    monkeypatch.setattr(train_tool, 'save_checkpoint', save_and_copy)
    with pytest.raises(runtime.ToolError, match=rf'loss is nan at step 4 \(epoch 2\).*{out} keeps the checkpoint of '
                                                rf'epoch 1 .*--pretrained-file {out / checkpoints.MODEL_FILE}'):
        train_tool.main(RUN + ['--output', str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == saved  # untouched since epoch 1
    assert json.loads((out / checkpoints.STATE_FILE).read_text())['epoch'] == 1
    assert all(v.isfinite().all() for v in _tensors(out / checkpoints.MODEL_FILE).values())


def test_under_float16_the_scaler_skips_non_finite_steps_then_the_run_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, 'evaluate', lambda *args, **kwargs: {'top1': 0., 'top5': 0., 'num_images': 0})
    run = TINY + ['--epochs', '1', '--max-steps-per-epoch', '6', '--amp', '--amp-dtype', 'float16']
    with monkeypatch.context() as patch:
        poison_batches(patch, poisoned={2, 3})  # skipped by the scaler: the weights stay finite
        metrics = train_tool.main(run + ['--output', str(tmp_path / 'skipped')])
    assert np.isfinite(metrics['train_loss'])
    state = json.loads((tmp_path / 'skipped' / checkpoints.STATE_FILE).read_text())
    assert state['grad_scaler']['scale'] == 2. ** 16 / 4  # halved by each skipped step
    assert all(v.isfinite().all() for v in _tensors(tmp_path / 'skipped' / checkpoints.MODEL_FILE).values())
    poison_batches(monkeypatch, poisoned={2, 3, 4})
    with pytest.raises(runtime.ToolError, match=r'loss is nan at step 4 \(epoch 1\) for 3 steps in a row \(the float16 '
                                                r'gradient scaler skipped them\).*--amp-dtype bfloat16'):
        train_tool.main(run + ['--output', str(tmp_path / 'stopped')])


def test_weights_that_are_not_finite_are_never_saved(tmp_path, monkeypatch):
    """An infinite weight after a finite loss (the last step's update): the second epoch's checkpoint is not written."""
    out = tmp_path / 'run'
    train_one_epoch = train_tool.train_one_epoch

    def overflowing_second_epoch(model, *args, **kwargs):
        result = train_one_epoch(model, *args, **kwargs)
        if args[-3] == 1:  # (..., epoch, step, steps): the second epoch
            with torch.no_grad():
                model.blocks[0].attn.qkv.bias[3] = float('inf')
        return result

    monkeypatch.setattr(train_tool, 'train_one_epoch', overflowing_second_epoch)
    with pytest.raises(runtime.ToolError, match=rf'after step 6 the weights are not finite \(model\.blocks\.0\.attn\.'
                                                rf'qkv\.bias\) although the loss was: not saved, {out} keeps its last good'):
        train_tool.main(RUN + ['--output', str(out)])
    assert json.loads((out / checkpoints.STATE_FILE).read_text())['epoch'] == 1
    assert all(v.isfinite().all() for v in _tensors(out / checkpoints.MODEL_FILE).values())


def test_eval_reports_non_finite_outputs_and_fails(run_dir, tmp_path):
    """Finite weights whose logits overflow: an accuracy of them would be meaningless."""
    weights = _tensors(run_dir / checkpoints.MODEL_FILE)
    weights['head.weight'][0] = 3e38
    torch.save(weights, tmp_path / 'overflowing.pth')
    with pytest.raises(runtime.ToolError, match=r'gives non-finite logits \(NaN or Inf\) for 360 of the 360 images of '
                                                r'digits/val: its accuracy would mean nothing'):
        eval_tool.main(TINY + ['--checkpoint', str(tmp_path / 'overflowing.pth')])


# ---------------------------------------------------------------- damaged checkpoint files (issue 25, item 3)

def test_pretrained_file_is_verified_before_timm_reads_it(run_dir, tmp_path):
    weights = _tensors(run_dir / checkpoints.MODEL_FILE)
    weights['blocks.1.mlp.fc2.weight'][2, 3] = float('nan')
    torch.save({'state_dict': weights}, tmp_path / 'diverged.pth')
    with pytest.raises(runtime.ToolError, match=r'diverged\.pth holds non-finite values \(NaN or Inf\) in 1 tensors: '
                                                r'state_dict\.blocks\.1\.mlp\.fc2\.weight'):
        models.create_model(MODEL, num_classes=10, pretrained_file=str(tmp_path / 'diverged.pth'))
    (tmp_path / 'empty.pth').touch()
    with pytest.raises(runtime.ToolError, match=r'empty\.pth is empty \(0 bytes\)'):
        train_tool.main(TINY + ['--pretrained-file', str(tmp_path / 'empty.pth'), '--output', str(tmp_path / 'run')])


# ---------------------------------------------------------------- bad arguments (issue 25, item 8)

@pytest.mark.parametrize('argv, message', [
    (['--epochs', '0'], r'--epochs 0: must be at least 1$'),
    (['--batch-size', '0'], r'--batch-size 0: must be at least 1$'),
    (['--lr', 'nan'], r'--lr nan: must be at least 0'),
    (['--img-size', '8'], r'--img-size 8: test_vit cannot take 8 x 8 images \(AssertionError: Input height \(8\) should '
                          r'be divisible by patch size \(16\)\.\); use its own size, 160, or another size it takes'),
    (['--model-kwargs', 'drop_rate=abc'], r"--model-kwargs drop_rate='abc': test_vit cannot be built with them \(TypeError: "
                                          r".*\); check the names and the values' types"),
])
def test_train_checks_its_arguments_before_any_work(tmp_path, monkeypatch, argv, message):
    def no_data(*args, **kwargs):
        raise AssertionError('the training data was read before the arguments were checked')

    monkeypatch.setattr(train_tool.datasets, 'build_dataset', no_data)
    with pytest.raises(runtime.ToolError, match=message):
        train_tool.main(TINY + ['--output', str(tmp_path / 'run')] + argv)


def test_a_failed_download_names_the_url_and_the_local_file_option(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise URLError('[Errno -2] Name or service not known')

    monkeypatch.setattr(builder, 'load_state_dict_from_url', offline)
    with pytest.raises(runtime.ToolError, match=r'--pretrained: cannot download the weights of cswin_tiny_224 from '
                                                r'https://github\.com/microsoft/CSWin-Transformer/releases/download/v0\.1'
                                                r'\.0/cswin_tiny_224\.pth \(URLError: .*\)\. .*--pretrained-file'):
        models.create_model('cswin_tiny_224', num_classes=10, pretrained=True, model_kwargs=dict(depths=(1, 1, 1, 1)))


def test_resuming_a_finished_run_is_an_error(run_dir):
    with pytest.raises(runtime.ToolError, match=rf'{run_dir} has finished: it trained all its 2 epochs, so there is '
                                                rf'nothing to resume\. To train longer, start a new run from its weights: '
                                                rf'--model test_vit --pretrained-file {run_dir / checkpoints.MODEL_FILE}'):
        train_tool.main(['--resume', str(run_dir), '--device', 'cpu'])


def test_benchmark_refuses_an_unknown_model_before_timing(monkeypatch):
    benchmark = _load_tool('benchmark')
    monkeypatch.setattr(benchmark, 'run_models', lambda *args: pytest.fail('timed before checking the names'))
    for option in ('--models', '--baseline'):
        with pytest.raises(runtime.ToolError, match=rf"{option}: unknown model 'nat_minii'.*Close names: nat_mini"):
            benchmark.main(['models', option, 'nat_minii', '--warmup', '0', '--iters', '1', '--batch', '1'])
    with pytest.raises(runtime.ToolError, match='--batch 0: must be at least 1'):
        benchmark.main(['models', '--models', 'test_vit', '--batch', '0'])


class _MatmulDtypes(TorchDispatchMode):
    """Notes the input dtypes of every matrix product torch runs (below autocast, so after its casts)."""
    MATMULS = ('mm', 'addmm', 'bmm', 'baddbmm')

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.MATMULS:
            self.dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def test_amp_training_step_on_cpu(tmp_path):
    out = tmp_path / 'amp'
    with _MatmulDtypes() as matmuls:
        metrics = train_tool.main(TINY + ['--epochs', '1', '--max-steps-per-epoch', '2', '--amp', '--output', str(out)])
    assert matmuls.dtypes == {torch.bfloat16}  # forward, backward and evaluation
    assert np.isfinite(metrics['train_loss'])
    runtime.seed_everything(0)  # the run's --seed: the same initial weights
    initial = models.create_model(MODEL, num_classes=10)
    trained = _tensors(out / checkpoints.MODEL_FILE)
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
    evaluated = eval_tool.main(args + ['--checkpoint', str(out / checkpoints.MODEL_FILE)])
    assert evaluated['num_images'] == 8
    assert evaluated['top1'] == pytest.approx(trained['val_top1'])
    (root / 'val' / 'bird').mkdir()
    with pytest.raises(runtime.ToolError, match='different classes'):
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


# tools/train.py whose process dies right after writing its first checkpoint (rank 0; the other ranks are
# then stopped by torchrun)
_TRAIN_UNTIL_FIRST_CHECKPOINT = """
import os
import sys

sys.path.insert(0, {tools!r})
import train

save = train.save_checkpoint


def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os._exit(3)


train.save_checkpoint = save_then_die
train.runtime.run_cli(train.main)
"""


def test_two_process_torchrun_resumed_equals_one_process_with_the_combined_batch(tmp_path):
    """DDP averages gradients over ranks, whose shards of a batch make up the one-process batch; a torchrun
    run killed after its first epoch and resumed under torchrun ends where the one-process run does."""
    steps = ['--epochs', '2', '--max-steps-per-epoch', '1', '--warmup-epochs', '0']
    common_args = ['--model', MODEL, '--img-size', str(IMG_SIZE), '--device', 'cpu'] + steps
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    ddp = tmp_path / 'ddp'
    killer = tmp_path / 'train_until_first_checkpoint.py'
    killer.write_text(_TRAIN_UNTIL_FIRST_CHECKPOINT.format(tools=str(TOOLS)))
    returncode, stderr = _run_process_group(
        torchrun + [str(killer), *common_args, '--batch-size', str(BATCH // 2), '--output', str(ddp)], env, timeout=300)
    assert returncode != 0 and json.loads((ddp / checkpoints.STATE_FILE).read_text())['epoch'] == 1, stderr[-3000:]
    returncode, stderr = _run_process_group(
        torchrun + [str(TOOLS / 'train.py'), '--resume', str(ddp), '--device', 'cpu'], env, timeout=300)
    assert returncode == 0, stderr[-3000:]

    train_tool.main(common_args + ['--batch-size', str(BATCH), '--output', str(tmp_path / 'single')])
    ddp_weights = _tensors(ddp / checkpoints.MODEL_FILE)
    single = _tensors(tmp_path / 'single' / checkpoints.MODEL_FILE)
    for key in single:
        torch.testing.assert_close(ddp_weights[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    ddp_state = json.loads((ddp / checkpoints.STATE_FILE).read_text())
    assert ddp_state['epoch'] == 2 and ddp_state['args']['batch_size'] == BATCH // 2
    assert [h['val_num_images'] for h in ddp_state['history']] == [360, 360]
