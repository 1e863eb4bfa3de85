"""What tools/mm_train.py and tools/mm_test.py share: a config file made ready for mmengine's Runner.

The task library (mmdet or mmseg) comes from the config's ``default_scope``, which every config that
inherits ``mmdet::_base_/default_runtime.py`` or ``mmseg::_base_/default_runtime.py`` sets. Importing
this module imports ``attnzoo.heads``, which registers ``AttnzooBackbone`` and makes mmengine load its
checkpoints with ``weights_only=True`` (see heads/checkpoint.py).

``--launcher pytorch`` under torchrun: on CUDA machines mmengine's own set-up runs (NCCL, one GPU per
process). Without CUDA, mmengine's set-up would call ``torch.cuda.set_device`` and wrap the model with
``device_ids=[LOCAL_RANK]``; every process then runs on the CPU instead (gloo, ``device_ids=None``) and
SyncBN layers, which synchronise only CUDA tensors, become BN.
"""
import argparse
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import mmengine.dist as mmengine_dist
from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.structures import BaseDataElement

import attnzoo.heads  # noqa: F401  (registers AttnzooBackbone; safe checkpoint loading)
from attnzoo.backbones._checkpoint import CheckpointError, nonfinite_tensors
from attnzoo.heads.checkpoint import UnsafeCheckpointError
from _runtime import ToolError

# the task libraries these tools drive: default_scope -> the package that provides it
SCOPES = {'mmdet': 'mmdet', 'mmseg': 'mmsegmentation'}
LAUNCHERS = ('none', 'pytorch')


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='directory for logs and checkpoints (default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries, e.g. train_cfg.max_iters=100 '
                             'train_dataloader.batch_size=4 (lists: key="[a,b]")')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help="'pytorch' under torchrun (one process per GPU, or per CPU worker without CUDA)")


def load_config(path: str, cfg_options: Optional[Dict[str, Any]], work_dir: Optional[str], launcher: str) -> Config:
    """The config at ``path`` with the command line's overrides, checked for a known task scope."""
    if not Path(path).is_file():
        raise ToolError(f'config {path} is not a file (the configs are under configs/<family>/)')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    check_scope(cfg, path)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = str(Path('work_dirs') / Path(path).stem)
    if isinstance(cfg.get('visualizer'), dict):
        # mmdet's / mmseg's runtimes name it 'visualizer': one process-wide instance, which a second
        # Runner in the same process (a tool's main() called twice) would reuse, logging into the first
        # run's directory; unnamed, each Runner names it after its own experiment
        cfg.visualizer.pop('name', None)
    if launcher != 'none':
        start_distributed(cfg)
    return cfg


def check_scope(cfg: Config, path: str) -> str:
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ToolError(
            f'{path} has default_scope {scope!r}; these tools drive mmdet or mmseg configs: inherit '
            f"'mmdet::_base_/default_runtime.py' or 'mmseg::_base_/default_runtime.py', or set "
            f"default_scope = 'mmdet' / 'mmseg'")
    if importlib.util.find_spec(scope) is None:
        raise ToolError(f'{path} is an {scope} config, but {scope} is not installed: pip install {SCOPES[scope]} '
                        f"(or pip install 'attnzoo[mm]')")
    importlib.import_module(f'{scope}.registry')  # the scope's registries, before the Runner resolves types
    return scope


def start_distributed(cfg: Config) -> None:
    if 'RANK' not in os.environ or 'LOCAL_RANK' not in os.environ:
        raise ToolError('--launcher pytorch: RANK / LOCAL_RANK are not set; start the tool with torchrun, e.g. '
                        'torchrun --nproc_per_node 2 tools/mm_train.py CONFIG --launcher pytorch')
    if torch.cuda.is_available():
        return  # mmengine's own set-up: NCCL, cuda:LOCAL_RANK
    dist.init_process_group(backend='gloo')
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel', broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = dict(wrapper, device_ids=None)
    cfg.model = _without_sync_bn(cfg.model)


def _without_sync_bn(node):
    if isinstance(node, dict):
        node = type(node)({key: _without_sync_bn(value) for key, value in node.items()})
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
        return node
    if isinstance(node, (list, tuple)):
        return type(node)(_without_sync_bn(item) for item in node)
    return node


class NonFiniteOutputsHook(Hook):
    """Counts the test images whose backbone features or predictions hold a NaN or an infinity: mmdet drops
    NaN-scored boxes and mmseg's argmax turns NaN logits into class 0, so the metrics alone would not show them."""

    def __init__(self):
        self.images = 0
        self.nonfinite = 0
        self._batch_flags = []  # per backbone call of this iteration: which of its samples were not finite

    def before_test(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if hasattr(model, 'backbone'):
            model.backbone.register_forward_hook(self._note_backbone)

    def _note_backbone(self, module, args, features) -> None:
        features = features if isinstance(features, (tuple, list)) else (features,)
        self._batch_flags.append(torch.stack([(~f.isfinite()).flatten(1).any(dim=1) for f in features]).any(dim=0))

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        outputs = list(outputs or [])
        flags = [bool(nonfinite_tensors(_as_dict(sample))) for sample in outputs]
        for call in self._batch_flags:  # slide inference and test-time augmentation call the backbone on crops
            flags = [a or b for a, b in zip(flags, call.tolist())] if len(call) == len(flags) else \
                [a or bool(call.any()) for a in flags]
        self._batch_flags = []
        self.images += len(outputs)
        self.nonfinite += sum(flags)

    def totals(self):
        """(images with non-finite outputs, images), over every process."""
        counts = torch.tensor([self.nonfinite, self.images], dtype=torch.float64)
        mmengine_dist.all_reduce(counts, op='sum')
        return int(counts[0]), int(counts[1])


def _as_dict(sample):
    """The data fields of an mmengine data element (DetDataSample, SegDataSample, ...), nested elements as dicts."""
    if isinstance(sample, BaseDataElement):
        return {key: _as_dict(value) for key, value in sample.items()}
    return sample


def run(cfg: Config, task: str):
    """Builds the Runner of ``cfg`` and runs its ``train()`` or ``test()``; a checkpoint refused for what
    it pickles, a damaged or non-finite one, and a test whose outputs are not finite become a :class:`ToolError`."""
    try:
        runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
        if task != 'test':
            return getattr(runner, task)()
        outputs_check = NonFiniteOutputsHook()
        runner.register_hook(outputs_check, priority='LOWEST')
        metrics = runner.test()
        nonfinite, images = outputs_check.totals()
        if nonfinite:
            raise ToolError(
                f'{nonfinite} of the {images} test images gave non-finite backbone features or predictions (NaN or '
                f'Inf), so the metrics above mean nothing: the checkpoint\'s weights overflow on these inputs (or '
                f'the images hold NaN); use an earlier checkpoint of the training run')
        return metrics
    except (UnsafeCheckpointError, CheckpointError) as error:
        raise ToolError(str(error)) from error
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def ensure_file(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise ToolError(f'{what} {path} is not a file')
    return path
