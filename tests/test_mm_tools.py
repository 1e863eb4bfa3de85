"""tools/mm_train.py and tools/mm_test.py end to end on tiny generated COCO / ADE20K sets, and the safe
loading of mmengine checkpoints (heads/checkpoint.py).

The repository's own configs (CSWin-T and NAT-Mini; Mask R-CNN and UPerNet / Semantic FPN) are adapted
to the tiny sets the way a user adapts a config to their data (tests/mm_tiny_data.py), with one block per
stage and 64 x 64 images to fit CI's budget. The tools run in-process, except the run killed mid-way
(SIGKILL, from a hook inside it) and the torchrun run.
"""
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mm_stack import skip_module_without_mm

skip_module_without_mm()

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.logging.history_buffer import HistoryBuffer  # noqa: E402
from mmengine.runner.checkpoint import _load_checkpoint  # noqa: E402

from attnzoo.heads.checkpoint import OPENMMLAB_CHECKPOINT_GLOBALS, UnsafeCheckpointError  # noqa: E402
import mm_tiny_data as tiny  # noqa: E402
from test_heads import block_downloads  # noqa: E402

pytestmark = [pytest.mark.mm, pytest.mark.usefixtures('one_thread')]  # tiny shapes (conftest.py)

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import _runtime  # noqa: E402
import mm_test  # noqa: E402
import mm_train  # noqa: E402

SHALLOW = dict(depths=(1, 1, 1, 1), drop_path_rate=0.)
CONFIGS = {
    ('cswin', 'det'): REPO / 'configs/cswin/mask-rcnn_cswin-t_fpn_1x_coco.py',
    ('cswin', 'seg'): REPO / 'configs/cswin/upernet_cswin-t_8xb2-160k_ade20k-512x512.py',
    ('cswin', 'fpn'): REPO / 'configs/cswin/fpn_cswin-t_8xb2-80k_ade20k-512x512.py',
    ('nat', 'det'): REPO / 'configs/nat/mask-rcnn_nat-mini_fpn_ms-crop-3x_coco.py',
    ('nat', 'seg'): REPO / 'configs/nat/upernet_nat-mini_8xb2-160k_ade20k-512x512.py',
}


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory):
    return tiny.write_coco_instances(tmp_path_factory.mktemp('coco'))


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory):
    return tiny.write_ade_segmentation(tmp_path_factory.mktemp('ade'))


def detection_config(path: Path, family: str, coco_root: Path, dump: Path) -> Path:
    """2 epochs of 2 iterations; validation after each epoch also dumps its predictions to ``dump``."""
    extra = tiny.config_text(
        model=dict(backbone=dict(pretrained=False, **SHALLOW),
                   roi_head=dict(bbox_head=dict(num_classes=2), mask_head=dict(num_classes=2)),
                   # an untrained box head scores everything below 0.05: keep its best, so masks are predicted
                   test_cfg=dict(rcnn=dict(score_thr=0., max_per_img=20))),
        optim_wrapper=dict(type='OptimWrapper'),  # the NAT configs train in float16 on GPUs
        train_cfg=dict(max_epochs=2),
        randomness=dict(seed=0),
        default_hooks=dict(logger=dict(interval=1)),
        val_evaluator=[dict(type='CocoMetric', ann_file=f'{coco_root}/annotations/val.json', metric=['bbox', 'segm']),
                       dict(type='DumpDetResults', out_file_path=str(dump))])
    return tiny.derived_config(path, CONFIGS[family, 'det'], coco_root, extra)


def segmentation_config(path: Path, family: str, ade_root: Path, kept: Path = None, method: str = 'seg',
                        max_iters: int = 4, extra: str = '') -> Path:
    """``max_iters`` iterations, a checkpoint every 2, validation at the end (keeping its label maps in ``kept``)."""
    decode_head = dict(dropout_ratio=0.)  # dropout's random state does not survive a resume
    text = tiny.config_text(
        model=dict(backbone=dict(pretrained=False, **SHALLOW), decode_head=decode_head),
        optim_wrapper=dict(type='OptimWrapper'),
        train_cfg=dict(max_iters=max_iters, val_interval=max_iters),
        randomness=dict(seed=0),
        default_hooks=dict(logger=dict(interval=1), checkpoint=dict(interval=2)),
        val_evaluator=dict(output_dir=str(kept), keep_results=True) if kept else {})
    return tiny.derived_config(path, CONFIGS[family, method], ade_root, f'{text}\n{extra}')


def logged_metrics(work_dir: Path, key: str) -> dict:
    """The last validation metrics a run logged (mmengine's scalars.json) that include ``key``."""
    records = [json.loads(line) for path in sorted(work_dir.glob('*/vis_data/scalars.json'))
               for line in path.read_text().splitlines()]
    return [record for record in records if key in record][-1]


def label_maps(directory: Path) -> dict:
    return {path.name: cv2.imread(str(path), cv2.IMREAD_UNCHANGED) for path in sorted(directory.glob('*.png'))}


def assert_same_detections(dumped: Path, expected: Path):
    got, want = (pickle.loads(path.read_bytes()) for path in (dumped, expected))
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert a['img_id'] == b['img_id']
        pa, pb = a['pred_instances'], b['pred_instances']
        assert len(pa['scores']) > 0
        for key in ('bboxes', 'scores', 'labels'):
            torch.testing.assert_close(pa[key], pb[key], rtol=0, atol=0)
        assert [m['counts'] for m in pa['masks']] == [m['counts'] for m in pb['masks']]


# ---------------------------------------------------------------- train, then test the checkpoint

@pytest.mark.parametrize('family', ['cswin', 'nat'])
def test_mask_rcnn_trains_and_its_checkpoint_tests_to_the_same_coco_metrics(family, coco_root, tmp_path):
    config = detection_config(tmp_path / 'det.py', family, coco_root, dump=tmp_path / 'val_predictions.pkl')
    mm_train.main([str(config), '--work-dir', str(tmp_path / 'train')])
    checkpoints = sorted(p.name for p in (tmp_path / 'train').glob('epoch_*.pth'))
    assert checkpoints == ['epoch_1.pth', 'epoch_2.pth']
    assert (tmp_path / 'train' / 'last_checkpoint').read_text().endswith('epoch_2.pth')
    trained = logged_metrics(tmp_path / 'train', 'coco/bbox_mAP')

    metrics = mm_test.main([str(config), str(tmp_path / 'train' / 'epoch_2.pth'), '--work-dir',
                            str(tmp_path / 'test'), '--out', str(tmp_path / 'test_predictions.pkl')])
    for task in ('bbox', 'segm'):
        for stat in ('mAP', 'mAP_50', 'mAP_75', 'mAP_s'):
            value = metrics[f'coco/{task}_{stat}']
            assert 0. <= value <= 1., (task, stat, value)
            assert value == pytest.approx(trained[f'coco/{task}_{stat}'], abs=1e-4)
    # the checkpoint's weights, not a fresh model: every box, score and mask as the run's last validation
    assert_same_detections(tmp_path / 'test_predictions.pkl', tmp_path / 'val_predictions.pkl')


@pytest.mark.parametrize('family', ['cswin', 'nat'])
def test_upernet_trains_and_its_checkpoint_tests_to_the_same_miou(family, ade_root, tmp_path):
    config = segmentation_config(tmp_path / 'seg.py', family, ade_root, kept=tmp_path / 'val_maps')
    mm_train.main([str(config), '--work-dir', str(tmp_path / 'train')])
    assert sorted(p.name for p in (tmp_path / 'train').glob('iter_*.pth')) == ['iter_2.pth', 'iter_4.pth']
    trained = logged_metrics(tmp_path / 'train', 'mIoU')

    metrics = mm_test.main([str(config), str(tmp_path / 'train' / 'iter_4.pth'), '--work-dir',
                            str(tmp_path / 'test'), '--out', str(tmp_path / 'test_maps')])
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert 0. <= metrics[key] <= 100.
        assert metrics[key] == pytest.approx(trained[key], abs=1e-2)
    tested, validated = label_maps(tmp_path / 'test_maps'), label_maps(tmp_path / 'val_maps')
    assert len(tested) == 2 and tested.keys() == validated.keys()
    for name in tested:
        np.testing.assert_array_equal(tested[name], validated[name])


# ---------------------------------------------------------------- resume after a kill

def run_tool(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    result = subprocess.run([sys.executable, str(TOOLS / f'{tool}.py'), *args], env=env, capture_output=True,
                            text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f'{tool} exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return result


def test_resume_after_a_kill_continues_the_run_exactly(ade_root, tmp_path):
    """Killed (SIGKILL) after iteration 5 of 6 with checkpoints every 2: --resume restarts from iteration 4
    and ends with the weights and optimizer state of a run that was never interrupted."""
    config = segmentation_config(tmp_path / 'seg.py', 'cswin', ade_root, method='fpn', max_iters=6)
    killed = tmp_path / 'seg_killed.py'
    killed.write_text(f"_base_ = '{config}'\n" + tiny.config_text(
        custom_imports=dict(imports=['attnzoo.heads', 'mm_kill_hook'], allow_failed_imports=False),
        custom_hooks=[dict(type='KillAfterIteration', iteration=5)]))
    work_dir = tmp_path / 'interrupted'
    result = run_tool('mm_train', str(killed), '--work-dir', str(work_dir), check=False)
    assert result.returncode == -9, f'expected SIGKILL, got {result.returncode}:\n{result.stderr[-3000:]}'
    assert sorted(p.name for p in work_dir.glob('iter_*.pth')) == ['iter_2.pth', 'iter_4.pth']

    mm_train.main([str(config), '--work-dir', str(work_dir), '--resume'])
    mm_train.main([str(config), '--work-dir', str(tmp_path / 'uninterrupted')])

    resumed = torch.load(work_dir / 'iter_6.pth', weights_only=False)
    reference = torch.load(tmp_path / 'uninterrupted' / 'iter_6.pth', weights_only=False)
    assert resumed['meta']['iter'] == reference['meta']['iter'] == 6
    # the resumed run (the work dir's second, later timestamp) trained iterations 5 and 6 only
    resumed_log = sorted(work_dir.glob('*/vis_data/scalars.json'))[-1]
    assert [json.loads(line)['step'] for line in resumed_log.read_text().splitlines() if 'loss' in line] == [5, 6]
    for key, value in reference['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key
    assert resumed['optimizer']['param_groups'] == reference['optimizer']['param_groups']
    for index, state in reference['optimizer']['state'].items():
        for name, value in state.items():
            assert torch.equal(resumed['optimizer']['state'][index][name], value), (index, name)
    assert [s['last_step'] for s in resumed['param_schedulers']] == [s['last_step'] for s in reference['param_schedulers']]


# ---------------------------------------------------------------- checkpoints are loaded safely

def _allowed_names():
    names = set()
    for entry in OPENMMLAB_CHECKPOINT_GLOBALS:
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f'{entry.__module__}.{entry.__qualname__}')
    return names


@pytest.fixture(scope='module')
def runner_checkpoint(ade_root, tmp_path_factory):
    """A checkpoint written by mmengine's Runner (message hub, optimizer, schedulers, metadata)."""
    root = tmp_path_factory.mktemp('runner_checkpoint')
    config = segmentation_config(root / 'seg.py', 'cswin', ade_root, method='fpn', max_iters=2)
    mm_train.main([str(config), '--work-dir', str(root / 'train')])
    return config, root / 'train' / 'iter_2.pth'


def unsafe_globals_without_allow_list(path: Path) -> set:
    """What plain ``torch.load(weights_only=True)`` would refuse in ``path`` (importing attnzoo.heads has
    allow-listed OpenMMLab's types in this process; torch leaves those out of its answer)."""
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    finally:
        torch.serialization.add_safe_globals(allowed)


def test_runner_checkpoints_hold_only_allow_listed_globals(runner_checkpoint):
    _, path = runner_checkpoint
    unsafe = unsafe_globals_without_allow_list(path)
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe  # what makes plain weights_only loading fail
    assert unsafe <= _allowed_names()
    checkpoint = _load_checkpoint(str(path), map_location='cpu')
    buffer = checkpoint['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer) and np.isfinite(buffer.mean())
    assert checkpoint['meta']['iter'] == 2


class _RunsCommand:
    """Unpickling it would run a command (what a crafted checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return subprocess.check_call, (['touch', str(self.marker)],)


class _GetsAttribute:
    """Asks the unpickler for getattr(HistoryBuffer, '__init__'): the allow-listed class, another attribute."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


def test_a_checkpoint_with_a_foreign_object_is_refused_and_nothing_runs(runner_checkpoint, tmp_path):
    config, path = runner_checkpoint
    marker = tmp_path / 'ran'
    checkpoint = torch.load(path, weights_only=False)
    checkpoint['meta']['note'] = _RunsCommand(marker)
    crafted = tmp_path / 'crafted.pth'
    torch.save(checkpoint, crafted)

    # pickle protocol 2 (torch.save's) writes subprocess.check_call under its Python 2 name, commands.check_call
    with pytest.raises(_runtime.ToolError, match=r'refused to load .*crafted\.pth.*Unsupported global.*\.check_call'):
        mm_test.main([str(config), str(crafted), '--work-dir', str(tmp_path / 'test')])
    with pytest.raises(_runtime.ToolError, match='refused to load'):
        mm_train.main([str(config), '--work-dir', str(tmp_path / 'train'), '--resume', str(crafted)])
    assert not marker.exists()


def test_getattr_stands_in_only_for_history_buffer_statistics(tmp_path):
    path = tmp_path / 'getattr.pth'
    torch.save({'state_dict': {}, 'meta': {'x': _GetsAttribute()}}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"getattr\(.*HistoryBuffer.*'__init__'\)"):
        _load_checkpoint(str(path))


# ---------------------------------------------------------------- faults (issue 25)

def test_a_config_with_pretrained_weights_tests_offline(runner_checkpoint, tmp_path, monkeypatch):
    """The trained checkpoint holds the backbone's weights: testing a config as shipped (pretrained=True)
    downloads nothing, as OpenMMLab backbones load their pretrained weights in init_weights()."""
    config, path = runner_checkpoint
    plain = mm_test.main([str(config), str(path), '--work-dir', str(tmp_path / 'plain')])
    block_downloads(monkeypatch)
    offline = mm_test.main([str(config), str(path), '--work-dir', str(tmp_path / 'offline'),
                            '--cfg-options', 'model.backbone.pretrained=True'])
    assert offline == plain and 0 <= plain['mIoU'] <= 100


def test_non_finite_test_outputs_are_an_error(runner_checkpoint, tmp_path):
    """Finite weights whose features overflow: mmseg's argmax would turn the NaN logits into a mIoU."""
    config, path = runner_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    stem = next(k for k, v in checkpoint['state_dict'].items() if k.startswith('backbone.') and v.dim() == 4)
    checkpoint['state_dict'][stem] = torch.full_like(checkpoint['state_dict'][stem], 3e38)
    torch.save(checkpoint, tmp_path / 'overflowing.pth')
    with pytest.raises(_runtime.ToolError, match=r'2 of the 2 test images gave non-finite backbone features or '
                                                 r'predictions \(NaN or Inf\), so the metrics above mean nothing'):
        mm_test.main([str(config), str(tmp_path / 'overflowing.pth'), '--work-dir', str(tmp_path / 'test')])


def test_a_damaged_runner_checkpoint_is_refused(runner_checkpoint, tmp_path):
    config, path = runner_checkpoint
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    data = bytearray(path.read_bytes())
    start = record.header_offset + 4096
    data[start:start + 4096] = bytes(b ^ 0xff for b in data[start:start + 4096])
    (tmp_path / 'damaged.pth').write_bytes(data)
    with pytest.raises(_runtime.ToolError, match=rf'damaged\.pth is damaged: the CRC-32 check fails for 1 of its \d+ zip '
                                                 rf'records \({re.escape(record.filename)}\)'):
        mm_test.main([str(config), str(tmp_path / 'damaged.pth'), '--work-dir', str(tmp_path / 'test')])


# ---------------------------------------------------------------- command-line errors

def test_command_line_errors(tmp_path):
    config = str(CONFIGS['cswin', 'fpn'])
    no_scope = tmp_path / 'no_scope.py'
    no_scope.write_text('model = dict(type="X")\n')
    cases = [
        (mm_train, [str(tmp_path / 'missing.py')], 'is not a file'),
        (mm_train, [str(no_scope)], "default_scope None.*mmdet::_base_/default_runtime.py"),
        (mm_train, [config, '--resume', str(tmp_path / 'missing.pth')], '--resume checkpoint .* is not a file'),
        (mm_train, [config, '--auto-scale-lr'], 'auto_scale_lr.base_batch_size'),
        (mm_train, [config, '--launcher', 'pytorch'], 'torchrun'),
        (mm_test, [config, str(tmp_path / 'missing.pth')], 'checkpoint .* is not a file'),
    ]
    if not torch.cuda.is_available():
        cases.append((mm_train, [config, '--amp'], '--amp needs a CUDA device'))
    env = {k: os.environ.pop(k) for k in ('RANK', 'LOCAL_RANK') if k in os.environ}
    try:
        for tool, argv, match in cases:
            with pytest.raises(_runtime.ToolError, match=match):
                tool.main(argv + ['--work-dir', str(tmp_path / 'work')])
    finally:
        os.environ.update(env)


def test_amp_and_resume_options_set_the_config(tmp_path, monkeypatch):
    config = str(CONFIGS['cswin', 'det'])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = mm_train.prepare_config(mm_train.build_parser().parse_args(
        [config, '--amp', '--resume', '--auto-scale-lr', '--cfg-options', 'train_cfg.max_epochs=3']))
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.resume is True and cfg.load_from is None
    assert cfg.auto_scale_lr.enable is True
    assert cfg.train_cfg.max_epochs == 3
    assert cfg.work_dir == str(Path('work_dirs') / 'mask-rcnn_cswin-t_fpn_1x_coco')


# ---------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_two_cpu_processes_train(ade_root, tmp_path):
    """--launcher pytorch under torchrun without CUDA: two gloo processes, each on half the batches."""
    config = segmentation_config(tmp_path / 'seg.py', 'cswin', ade_root, method='fpn', max_iters=2)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '0',
         str(TOOLS / 'mm_train.py'), str(config), '--launcher', 'pytorch', '--work-dir', str(tmp_path / 'train')],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / 'train' / 'iter_2.pth').is_file()
    log = next((tmp_path / 'train').glob('*/*.log')).read_text()
    assert 'world_size: 2' in log and 'Distributed training is not used' not in log
