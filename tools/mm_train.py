"""Train an mmdet / mmseg model from a config with mmengine's Runner (attnzoo's backbones registered).

    python tools/mm_train.py configs/cswin/mask-rcnn_cswin-t_fpn_1x_coco.py
    python tools/mm_train.py CONFIG --resume                   # continue from the work dir's last checkpoint
    python tools/mm_train.py CONFIG --resume work_dirs/x/iter_4000.pth
    python tools/mm_train.py CONFIG --cfg-options train_cfg.max_iters=1000 train_dataloader.batch_size=4
    torchrun --nproc_per_node 8 tools/mm_train.py CONFIG --launcher pytorch

The config picks the task library (mmdet or mmseg, its ``default_scope``), the schedule, the data and
the checkpoint / evaluation intervals; progress, losses and metrics come from mmengine's logger, and
the work dir (default ``work_dirs/<config name>``) holds the checkpoints, ``last_checkpoint`` and the
logs. A resumed run continues with the saved iteration (or epoch) count, optimizer, scheduler and
gradient-scaler state, and skips the batches the killed run had already trained on.
"""
import argparse

import _mm
from _runtime import ToolError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='config file, e.g. configs/cswin/mask-rcnn_cswin-t_fpn_1x_coco.py')
    p.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CHECKPOINT',
                   help="continue a run: from CHECKPOINT, or without it from the work dir's last checkpoint "
                        '(a fresh start when the work dir holds none)')
    p.add_argument('--amp', action='store_true',
                   help='mixed precision (float16 with dynamic loss scaling; needs CUDA, as mmengine\'s AmpOptimWrapper)')
    p.add_argument('--auto-scale-lr', action='store_true',
                   help="scale the learning rate by the real batch size over the config's auto_scale_lr.base_batch_size")
    _mm.add_common_arguments(p)
    return p


def apply_amp(cfg) -> None:
    optim_wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if optim_wrapper == 'AmpOptimWrapper':
        return  # the config already trains in mixed precision
    if optim_wrapper != 'OptimWrapper':
        raise ToolError(f'--amp replaces the OptimWrapper with mmengine\'s AmpOptimWrapper, but the config uses '
                        f'{optim_wrapper}')
    import torch
    if not torch.cuda.is_available():
        raise ToolError('--amp needs a CUDA device (mmengine\'s AmpOptimWrapper scales float16 losses on GPUs only)')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.loss_scale = 'dynamic'


def apply_resume(cfg, resume: str) -> None:
    cfg.resume = True
    cfg.load_from = None if resume == 'auto' else _mm.ensure_file(resume, '--resume checkpoint')


def apply_auto_scale_lr(cfg) -> None:
    if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
        raise ToolError('--auto-scale-lr: the config has no auto_scale_lr.base_batch_size (the batch size its '
                        'learning rate was set for); add auto_scale_lr = dict(base_batch_size=16)')
    cfg.auto_scale_lr.enable = True


def prepare_config(args):
    cfg = _mm.load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    if args.amp:
        apply_amp(cfg)
    if args.resume is not None:
        apply_resume(cfg, args.resume)
    if args.auto_scale_lr:
        apply_auto_scale_lr(cfg)
    return cfg


def main(argv=None):
    """Trains; returns the trained model (the Runner's, unwrapped)."""
    args = build_parser().parse_args(argv)
    return _mm.run(prepare_config(args), 'train')


if __name__ == '__main__':
    run_cli(main)
