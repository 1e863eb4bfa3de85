"""Top-1 / top-5 accuracy of a checkpoint on the embedded digits dataset or an ImageFolder split.

    python tools/eval.py --model cswin_tiny_224 --dataset digits --checkpoint runs/digits/model.safetensors
    python tools/eval.py --model cswin_tiny_224 --dataset /data/imagenet --checkpoint cswin_tiny_224.pth

``--checkpoint`` is a ``model.safetensors`` / ``ema.safetensors`` written by tools/train.py, or
an official ``.pth`` / ``.pth.tar`` / ``.pt`` file: it is loaded with ``torch.load(weights_only=True)``,
unwrapped as every attnzoo loader unwraps (of a file holding trained and EMA weights, the ones the
family's official evaluation takes: ``attnzoo.backbones._checkpoint.checkpoint_use_ema``; ``--ema`` /
``--no-ema`` choose), and converted by
the model family's ``checkpoint_filter_fn``. Loading is strict: any missing,
unexpected or mis-shaped key is an error that lists them. The classifier has as many classes
as the dataset split has. For a file written by tools/train.py, ``--img-size`` and
``--model-kwargs`` default to the run's (read from ``train_state.json`` beside it). Runs under
torchrun too (each process evaluates a shard). A model that gives non-finite logits for any image is an
error (exit status 1), not an accuracy.
"""
import argparse
import json
from pathlib import Path

import torch
from timm.utils import ParseKwargs

from attnzoo.backbones._checkpoint import checkpoint_use_ema
import _checkpoints as checkpoints
import _datasets as datasets
import _evaluation as evaluation
import _models as models
import _runtime as runtime


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', required=True, help='timm or attnzoo model name, e.g. cswin_tiny_224')
    p.add_argument('--checkpoint', required=True, help='weights file: .safetensors, .pth, .pt or .bin')
    p.add_argument('--dataset', default=datasets.DIGITS,
                   help="'digits' (embedded, from scikit-learn) or an ImageFolder root")
    p.add_argument('--split', default='val', help="split to evaluate: 'val' or 'train' for digits, a folder otherwise")
    p.add_argument('--img-size', type=int, default=None,
                   help=f'input size; default: the training run\'s when {checkpoints.STATE_FILE} sits beside the checkpoint, '
                        f'else {datasets.DIGITS_IMG_SIZE} for digits and the model\'s own otherwise')
    p.add_argument('--ema', dest='use_ema', action=argparse.BooleanOptionalAction, default=None,
                   help="of a checkpoint holding both, take the EMA weights ('state_dict_ema' / 'model_ema') or, with "
                        "--no-ema, the trained ones ('state_dict' / 'model'); default: what the family's official "
                        "evaluation takes")
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra create_model arguments, key=value; default: the training run\'s, as for --img-size')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--amp', action='store_true', help='mixed precision: bfloat16 on CPU, float16 on CUDA')
    p.add_argument('--amp-dtype', choices=('float16', 'bfloat16'), default=None, help='override the AMP dtype')
    p.add_argument('--workers', type=int, default=0, help='data loader processes')
    p.add_argument('--device', default=runtime.default_device())
    p.add_argument('--json', default=None, metavar='PATH', help='also write the metrics to this JSON file')
    return p


def training_run_args(checkpoint: str, model: str) -> dict:
    """Arguments of the tools/train.py run that wrote ``checkpoint`` for ``model``; {} for other files."""
    state_file = Path(checkpoint).parent / checkpoints.STATE_FILE
    if not state_file.is_file():
        return {}
    run_args = checkpoints.read_train_state(state_file.parent)['args']
    return run_args if run_args['model'] == model else {}


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Builds the model, loads ``args.checkpoint`` strictly and measures it on ``args.split``."""
    dist_info = runtime.init_distributed(args.device)
    run_args = training_run_args(args.checkpoint, args.model)
    num_classes = datasets.num_classes_of(args.dataset, args.split)
    model = models.create_model(args.model, num_classes, model_kwargs=args.model_kwargs or run_args.get('model_kwargs'))
    use_ema = checkpoint_use_ema(model) if args.use_ema is None else args.use_ema
    checkpoints.load_weights(model, checkpoints.read_state_dict(args.checkpoint, use_ema), args.checkpoint)
    model.to(dist_info.device)
    config = datasets.data_config(model, args.dataset, args.img_size or run_args.get('img_size'))
    autocast_dtype = runtime.amp_dtype(args.amp, args.amp_dtype, dist_info.device)
    models.check_input_size(model, config['input_size'], args.img_size, autocast_dtype)
    loader = datasets.eval_loader(datasets.build_dataset(args.dataset, args.split, config, training=False),
                                args.batch_size, args.workers, dist_info)
    metrics = evaluation.evaluate(model, loader, dist_info, autocast_dtype,
                              desc=f'{args.model} on {args.dataset}/{args.split}')
    metrics |= {'model': args.model, 'checkpoint': str(args.checkpoint), 'dataset': args.dataset,
                'split': args.split, 'input_size': list(config['input_size'])}
    if metrics['nonfinite_images']:
        raise runtime.ToolError(
            f'{args.model} {args.checkpoint} gives non-finite logits (NaN or Inf) for {metrics["nonfinite_images"]} of '
            f'the {metrics["num_images"]} images of {args.dataset}/{args.split}: its accuracy would mean nothing. The '
            f'weights overflow on these inputs' + (' in reduced precision (try without --amp)' if args.amp else '')
            + '; use an earlier checkpoint of the training run')
    if dist_info.is_main:
        print(f'{args.model} {args.checkpoint}: top-1 {metrics["top1"]:.2f}%  top-5 {metrics["top5"]:.2f}%  '
              f'({metrics["num_images"]} images of {args.dataset}/{args.split})')
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(metrics, indent=1) + '\n')
    if dist_info.enabled:
        torch.distributed.destroy_process_group()
    return metrics


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    runtime.check_at_least(args, {'batch_size': 1, 'img_size': 1, 'workers': 0})
    return evaluate_checkpoint(args)


if __name__ == '__main__':
    runtime.run_cli(main)
