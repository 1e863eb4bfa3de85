"""Train a timm/attnzoo classifier on the embedded digits dataset or an ImageFolder directory.

    python tools/train.py --model cswin_tiny_224 --dataset digits --output runs/digits
    python tools/train.py --resume runs/digits                 # continue a killed run
    torchrun --nproc_per_node 8 tools/train.py --model ... --dataset /data/imagenet --output ...

AdamW with a per-step cosine schedule after a linear warmup, label smoothing, optional AMP
(bfloat16 on CPU, float16 with a gradient scaler on CUDA), optional EMA of the weights and
gradient clipping. ``--batch-size`` is per process; under torchrun every process trains on its
shard (DistributedDataParallel) and rank 0 writes the checkpoints.

After every epoch the output directory holds ``model.safetensors`` (``ema.safetensors`` with
``--ema``), ``optimizer.safetensors`` and ``train_state.json`` (epoch, step, arguments,
optimizer hyper-parameters, gradient-scaler state, metrics). ``--resume DIR`` restarts at the
epoch after the last complete one and reproduces the uninterrupted run: the learning rate is a
function of the step, and data order, dropout and augmentation are seeded from
(seed, epoch, rank) at the start of every epoch.

A non-finite training loss stops the run with an error that names the step and what to try; the run
directory keeps the checkpoint of the last complete epoch (a checkpoint is never written with non-finite
weights). Under float16 AMP the gradient scaler first skips such steps, as it skips steps whose gradients
overflow: the run stops when the loss stays non-finite for ``SCALER_SKIPPED_STEPS`` steps in a row.
"""
import argparse
import gc
import json
import time
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3, ParseKwargs
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from attnzoo.backbones._checkpoint import listed, nonfinite_tensors
import _checkpoints as checkpoints
import _datasets as datasets
import _evaluation as evaluation
import _models as models
import _runtime as runtime

# arguments that may differ between a run and its --resume (they do not change the result)
RESUMABLE_OVERRIDES = ('resume', 'workers', 'device')
# float16 AMP: steps in a row with a non-finite loss that the gradient scaler skips before the run stops
SCALER_SKIPPED_STEPS = 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', help='timm or attnzoo model name, e.g. cswin_tiny_224 (required unless --resume)')
    p.add_argument('--dataset', default=datasets.DIGITS,
                   help="'digits' (embedded, from scikit-learn) or an ImageFolder root with train/ and val/ folders")
    p.add_argument('--train-split', default='train', help='training folder under an ImageFolder root')
    p.add_argument('--val-split', default='val', help='validation folder under an ImageFolder root')
    p.add_argument('--img-size', type=int, default=None,
                   help=f'input size; default {datasets.DIGITS_IMG_SIZE} for digits, the model\'s own otherwise')
    p.add_argument('--output', default=None, help='run directory for checkpoints (default runs/<model>)')
    p.add_argument('--resume', default=None, metavar='DIR',
                   help='continue the run in DIR with its saved arguments')
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--max-steps-per-epoch', type=int, default=None, help='cap on optimizer steps per epoch (quick tests)')
    p.add_argument('--batch-size', type=int, default=32, help='images per step and process')
    p.add_argument('--lr', type=float, default=1e-3, help='peak learning rate')
    p.add_argument('--min-lr', type=float, default=1e-5, help='learning rate at the end of the cosine')
    p.add_argument('--warmup-epochs', type=float, default=1.0, help='linear warmup length (fractions allowed)')
    p.add_argument('--warmup-lr', type=float, default=1e-6, help='learning rate of the first step')
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--layer-decay', type=float, default=None,
                   help="layer-wise learning-rate decay for fine-tuning: each layer's rate is this times the one of "
                        "the layer after it (the classifier at --lr), by the model's group_matcher; e.g. 0.75")
    p.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    p.add_argument('--drop-path', type=float, default=None, help="stochastic depth rate (the model's default if unset)")
    p.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    p.add_argument('--ema', action='store_true', help='keep an exponential moving average of the weights')
    p.add_argument('--ema-decay', type=float, default=0.9998, help='EMA decay (with timm\'s decay warmup)')
    p.add_argument('--amp', action='store_true', help='mixed precision: bfloat16 on CPU, float16 on CUDA')
    p.add_argument('--amp-dtype', choices=('float16', 'bfloat16'), default=None, help='override the AMP dtype')
    p.add_argument('--pretrained', action='store_true', help="start from timm's pretrained weights (downloads)")
    p.add_argument('--pretrained-file', default=None,
                   help='start from a local checkpoint (official files go through the checkpoint_filter_fn)')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra create_model arguments, key=value')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--workers', type=int, default=0, help='data loader processes per training process')
    p.add_argument('--device', default=runtime.default_device())
    return p


def resolve_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parsed arguments; with ``--resume``, the run's saved ones (conflicting options are an error)."""
    args = parser.parse_args(argv)
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        parser.error(f'--layer-decay {args.layer_decay}: the decay per layer is in (0, 1] (1: no decay; 0.65-0.85 '
                     'is usual for fine-tuning)')
    if args.resume is None:
        if args.model is None:
            parser.error('--model is required (or --resume DIR)')
        if args.output is None:
            args.output = str(Path('runs') / args.model)
        if (Path(args.output) / checkpoints.STATE_FILE).exists():
            raise runtime.ToolError(f'{args.output} already holds a training run; continue it with --resume {args.output} '
                                   f'or choose another --output')
        check_args(args)
        return args
    state = checkpoints.read_train_state(args.resume)
    saved = state['args']
    defaults = vars(parser.parse_args([]))
    given = json.loads(json.dumps(vars(args)))
    for key, value in given.items():
        if key not in RESUMABLE_OVERRIDES + ('output',) and value != defaults[key] and value != saved.get(key):
            raise runtime.ToolError(f'--{key.replace("_", "-")} {value} differs from the resumed run\'s {saved.get(key)}; '
                                   f'--resume continues a run unchanged: drop the option, or start a new run in another --output')
    if args.output is not None and Path(args.output).resolve() != Path(args.resume).resolve():
        raise runtime.ToolError('--output differs from --resume; a resumed run keeps writing into its own directory')
    # options added to the tool after the run was saved take their defaults
    merged = {**defaults, **saved, **{k: given[k] for k in RESUMABLE_OVERRIDES}, 'output': args.resume}
    if state['epoch'] >= saved['epochs']:
        raise runtime.ToolError(
            f'{args.resume} has finished: it trained all its {saved["epochs"]} epochs, so there is nothing to resume. To '
            f'train longer, start a new run from its weights: --model {saved["model"]} --pretrained-file '
            f'{Path(args.resume) / checkpoints.MODEL_FILE} --epochs N --output NEW_DIR')
    return argparse.Namespace(**merged)


# options that must be at least this (None: unset, where the option allows it)
MINIMUM_VALUES = {'epochs': 1, 'batch_size': 1, 'max_steps_per_epoch': 1, 'img_size': 1, 'workers': 0, 'lr': 0.,
                  'min_lr': 0., 'warmup_epochs': 0., 'warmup_lr': 0., 'weight_decay': 0., 'smoothing': 0.,
                  'drop_path': 0., 'clip_grad': 0.}
# options that must be below this
BELOW_VALUES = {'smoothing': 1., 'drop_path': 1., 'ema_decay': 1.}


def check_args(args: argparse.Namespace) -> None:
    """Raises a :class:`ToolError` for an option no run can use, before any work; the sizes the model
    takes are checked once it is built (:func:`_models.check_input_size`)."""
    runtime.check_at_least(args, MINIMUM_VALUES)
    for name, bound in BELOW_VALUES.items():
        value = getattr(args, name)
        if value is not None and not value < bound:
            raise runtime.ToolError(f'--{name.replace("_", "-")} {value}: must be below {bound}')
    if args.warmup_epochs > args.epochs:
        raise runtime.ToolError(f'--warmup-epochs {args.warmup_epochs} is longer than the run (--epochs {args.epochs})')


def save_checkpoint(output: Path, model, ema, optimizer, scaler, args, epoch: int, step: int, history: list) -> None:
    files = {checkpoints.MODEL_FILE: checkpoints.tensors_to_bytes(model.state_dict(), step)}
    if ema is not None:
        files[checkpoints.EMA_FILE] = checkpoints.tensors_to_bytes(ema.module.state_dict(), step)
    files[checkpoints.OPTIMIZER_FILE] = checkpoints.tensors_to_bytes(checkpoints.optimizer_tensors(optimizer), step)
    state = {
        'format': checkpoints.STATE_FORMAT,
        'epoch': epoch,
        'step': step,
        'args': vars(args),
        'optimizer_param_groups': optimizer.state_dict()['param_groups'],
        'grad_scaler': scaler.state_dict() if scaler is not None else None,
        'history': history,
    }
    files[checkpoints.STATE_FILE] = json.dumps(state, indent=1).encode()  # last: marks the set complete
    checkpoints.write_files_atomically(output, files)


def refuse_nonfinite_weights(model, ema, output: Path, step: int) -> None:
    """Raises a :class:`ToolError` naming the weights (of the model, or its EMA) that are not finite, so that
    the last good checkpoint in ``output`` is never overwritten by a diverged one."""
    weights = {'model': model.state_dict(), **({'ema': ema.module.state_dict()} if ema is not None else {})}
    names = nonfinite_tensors(weights)
    if names:
        raise runtime.ToolError(
            f'after step {step} the weights are not finite ({listed(names)}) although the loss was: not saved, '
            f'{output} keeps its last good checkpoint. Try a lower --lr or --clip-grad 1.0, and start a new run')


def nonfinite_loss_error(loss: torch.Tensor, step: int, epoch: int, args, output: Path, scaled: bool) -> runtime.ToolError:
    """The error that stops a run whose loss is not finite (here, or on another process) at optimizer step ``step``."""
    value = 'not finite on another process' if loss.isfinite() else loss.item()
    saved = checkpoints.read_train_state(output)['epoch'] if (output / checkpoints.STATE_FILE).is_file() else 0
    kept = (f'{output} keeps the checkpoint of epoch {saved} (continue from its weights in a new run: '
            f'--pretrained-file {output / checkpoints.MODEL_FILE})' if saved else 'no epoch finished, nothing was saved')
    skipped = f' for {SCALER_SKIPPED_STEPS} steps in a row (the float16 gradient scaler skipped them)' if scaled else ''
    amp = (', or bfloat16 AMP (--amp-dtype bfloat16), whose range does not overflow' if scaled
           else ', or no --amp' if args.amp else '')
    return runtime.ToolError(
        f'the training loss is {value} at step {step + 1} (epoch {epoch + 1}){skipped}: the run diverged and stopped; '
        f'{kept}. Try a lower --lr (now {args.lr:g}), a longer --warmup-epochs (now {args.warmup_epochs:g}), '
        f'--clip-grad 1.0{amp}; check the data for NaN or Inf values')


def load_checkpoint(run_dir: Path, model, ema, optimizer, scaler) -> dict:
    state = checkpoints.read_train_state(run_dir)
    step = state['step']
    checkpoints.load_weights(model, checkpoints.read_safetensors(run_dir / checkpoints.MODEL_FILE, step), str(run_dir / checkpoints.MODEL_FILE))
    if ema is not None:
        checkpoints.load_weights(ema.module, checkpoints.read_safetensors(run_dir / checkpoints.EMA_FILE, step), str(run_dir / checkpoints.EMA_FILE))
    checkpoints.load_optimizer(optimizer, checkpoints.read_safetensors(run_dir / checkpoints.OPTIMIZER_FILE, step),
                          state['optimizer_param_groups'])
    if scaler is not None:
        scaler.load_state_dict(state['grad_scaler'])
    return state


def train_one_epoch(model, ema, loader, optimizer, scheduler, scaler, criterion, args, dist_info,
                    autocast_dtype, epoch: int, step: int, steps: int):
    """Runs ``steps`` optimizer steps; returns the global step after them and the mean loss."""
    model.train()
    device = dist_info.device
    loss_sum = torch.zeros(2, device=device)  # the finite losses' sum and count
    nonfinite_run = 0  # steps in a row whose loss is not finite
    bar = tqdm(total=steps, desc=f'epoch {epoch + 1}/{args.epochs}', disable=not dist_info.is_main, dynamic_ncols=True)
    start = time.perf_counter()
    for i, (images, labels) in zip(range(steps), loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        scheduler.step_update(num_updates=step)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = criterion(model(images), labels)
        finite = all_ranks_finite(loss, dist_info)
        nonfinite_run = 0 if finite else nonfinite_run + 1
        # without a scaler the step would write NaN into the weights; with one, it skips the step itself
        if nonfinite_run > (SCALER_SKIPPED_STEPS - 1 if scaler is not None else 0):
            bar.close()
            raise nonfinite_loss_error(loss.detach(), step, epoch, args, Path(args.output), scaler is not None)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if args.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        if ema is not None:
            ema.update(models.unwrap(model), step=step)
        if finite:
            loss_sum += torch.stack([loss.detach().float(), torch.ones((), device=device)])
        bar.update()
        if dist_info.is_main and (i % 10 == 0 or i == steps - 1):
            rate = (i + 1) * args.batch_size * dist_info.world_size / (time.perf_counter() - start)
            bar.set_postfix(loss=f'{loss.item():.3f}', lr=f'{max(g["lr"] for g in optimizer.param_groups):.2e}', img_s=f'{rate:.1f}')
    bar.close()
    if dist_info.enabled:
        torch.distributed.all_reduce(loss_sum)
    total, counted = loss_sum.tolist()
    return step, total / counted if counted else float('nan')


def all_ranks_finite(loss: torch.Tensor, dist_info: runtime.DistInfo) -> bool:
    """Whether the loss is finite on every process (all of them stop together, or none)."""
    finite = loss.detach().isfinite().to(torch.int32)
    if dist_info.enabled:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


def train(args: argparse.Namespace) -> dict:
    """Trains as ``args`` say and returns the last epoch's metrics."""
    dist_info = runtime.init_distributed(args.device)
    metrics = _train(args, dist_info)
    if dist_info.enabled:
        # The DDP wrapper must be gone before the process group: a reducer that holds the group's
        # last reference destroys it under the GIL, which deadlocks gloo's worker threads.
        gc.collect()
        torch.distributed.destroy_process_group()
    return metrics


def _train(args: argparse.Namespace, dist_info: runtime.DistInfo) -> dict:
    device = dist_info.device
    output = Path(args.output)
    runtime.seed_everything(args.seed)  # the same initial weights on every rank

    num_classes = datasets.num_classes_of(args.dataset, args.train_split)
    datasets.check_same_classes(args.dataset, args.train_split, args.val_split)
    model = models.create_model(args.model, num_classes, args.pretrained, args.pretrained_file,
                                args.drop_path, args.model_kwargs).to(device)
    config = datasets.data_config(model, args.dataset, args.img_size)
    autocast_dtype = runtime.amp_dtype(args.amp, args.amp_dtype, device)
    models.check_input_size(model, config['input_size'], args.img_size, autocast_dtype)
    loader = datasets.train_loader(datasets.build_dataset(args.dataset, args.train_split, config, training=True),
                                 args.batch_size, args.workers, dist_info, args.seed)
    val_loader = datasets.eval_loader(datasets.build_dataset(args.dataset, args.val_split, config, training=False),
                                    args.batch_size, args.workers, dist_info)
    steps = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)

    optimizer = create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=args.weight_decay,
                                    layer_decay=args.layer_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps, lr_min=args.min_lr,
                                  warmup_t=round(args.warmup_epochs * steps), warmup_lr_init=args.warmup_lr,
                                  t_in_epochs=False)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=args.ema_decay, use_warmup=True) if args.ema else None
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    start_epoch, step, history = 0, 0, []
    if args.resume is not None:
        state = load_checkpoint(output, model, ema, optimizer, scaler)
        start_epoch, step, history = state['epoch'], state['step'], state['history']
    if dist_info.is_main:
        print(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, '
              f'{num_classes} classes, input {config["input_size"]}, {len(loader.dataset)} training images, '
              f'{steps} steps/epoch x {args.batch_size} x {dist_info.world_size} processes on {device}'
              + (f', resuming after epoch {start_epoch}' if start_epoch else ''))
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None) \
        if dist_info.enabled else model

    for epoch in range(start_epoch, args.epochs):
        runtime.seed_everything(args.seed, epoch + 1, dist_info.rank)
        loader.sampler.set_epoch(epoch)
        step, train_loss = train_one_epoch(train_model, ema, loader, optimizer, scheduler, scaler, criterion, args,
                                           dist_info, autocast_dtype, epoch, step, steps)
        metrics = {'epoch': epoch + 1, 'step': step, 'train_loss': train_loss}
        metrics |= {f'val_{k}': v for k, v in evaluation.evaluate(model, val_loader, dist_info, autocast_dtype,
                                                               desc='val', leave=False).items()}
        if ema is not None:
            metrics |= {f'ema_val_{k}': v for k, v in evaluation.evaluate(ema.module, val_loader, dist_info, autocast_dtype,
                                                                      desc='val ema', leave=False).items()}
        history.append(metrics)
        if dist_info.is_main:
            ema_text = f', EMA top-1 {metrics["ema_val_top1"]:.2f}%' if ema is not None else ''
            print(f'epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, val top-1 {metrics["val_top1"]:.2f}% '
                  f'top-5 {metrics["val_top5"]:.2f}%{ema_text}', flush=True)
        refuse_nonfinite_weights(model, ema, output, step)  # on every process: all stop together
        if dist_info.is_main:
            save_checkpoint(output, model, ema, optimizer, scaler, args, epoch + 1, step, history)
        if dist_info.enabled:
            torch.distributed.barrier()
    return history[-1] if history else {}


def main(argv=None) -> dict:
    return train(resolve_args(build_parser(), argv))


if __name__ == '__main__':
    runtime.run_cli(main)
