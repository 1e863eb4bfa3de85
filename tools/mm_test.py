"""Evaluate an mmdet / mmseg checkpoint on a config's test set with mmengine's Runner.

    python tools/mm_test.py configs/cswin/mask-rcnn_cswin-t_fpn_1x_coco.py work_dirs/x/epoch_12.pth
    python tools/mm_test.py CONFIG CHECKPOINT --show-dir vis --out results.pkl
    torchrun --nproc_per_node 8 tools/mm_test.py CONFIG CHECKPOINT --launcher pytorch

The metrics are the config's ``test_evaluator`` (COCO box / mask AP, mIoU, ...), logged by mmengine and
written as JSON under the work dir. The checkpoint is any file mmengine loads (a Runner checkpoint, or
``{'state_dict': ...}``), read with ``weights_only=True`` after it is verified (CRCs, sizes, finite values).
The backbone's pretrained weights are not needed: the checkpoint holds the trained ones, and they load in
``init_weights()``, which testing does not call, so a config with ``pretrained=True`` tests offline. Test
images whose backbone features or predictions are not finite are an error (exit status 1) after the metrics.
"""
import argparse

import _mm
from _runtime import ToolError, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('config', help='config file the checkpoint was trained with')
    p.add_argument('checkpoint', help='checkpoint file (e.g. work_dirs/<config>/iter_160000.pth)')
    p.add_argument('--show-dir', help='draw the predictions on the test images into this directory '
                                      '(under the run\'s timestamped work dir unless absolute)')
    p.add_argument('--out', help='keep the raw predictions: mmdet, a .pkl file; mmseg, a directory of label maps')
    _mm.add_common_arguments(p)
    return p


def show_predictions(cfg, show_dir: str) -> None:
    if 'visualization' not in cfg.get('default_hooks', {}):
        raise ToolError("--show-dir needs default_hooks.visualization (mmdet's / mmseg's default_runtime.py has it)")
    cfg.default_hooks.visualization.draw = True
    if cfg.default_scope == 'mmdet':
        cfg.default_hooks.visualization.test_out_dir = show_dir
    else:
        cfg.visualizer.save_dir = show_dir


def keep_predictions(cfg, out: str) -> None:
    if cfg.default_scope == 'mmdet':
        if not out.endswith(('.pkl', '.pickle')):
            raise ToolError(f'--out {out}: mmdet predictions are saved as a .pkl file')
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        cfg.test_evaluator = [*evaluators, dict(type='DumpDetResults', out_file_path=out)]
    else:
        cfg.test_evaluator.output_dir = out
        cfg.test_evaluator.keep_results = True


def prepare_config(args):
    cfg = _mm.load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    cfg.load_from = _mm.ensure_file(args.checkpoint, 'checkpoint')
    if args.show_dir:
        show_predictions(cfg, args.show_dir)
    if args.out:
        keep_predictions(cfg, args.out)
    return cfg


def main(argv=None) -> dict:
    """Evaluates; returns the metrics."""
    args = build_parser().parse_args(argv)
    return _mm.run(prepare_config(args), 'test')


if __name__ == '__main__':
    run_cli(main)
