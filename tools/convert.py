"""Converts an official checkpoint into a safetensors file that loads into an attnzoo / timm model.

    python tools/convert.py moat_0 moat0_imagenet_1k_224_w_position_embedding/model-ckpt moat_0.safetensors
    python tools/convert.py cswin_tiny_224 cswin_tiny_224.pth cswin_tiny_224.safetensors

The source format is detected (``--format`` overrides it), and each format has a reader:

* ``tf``: a TensorFlow checkpoint (``PREFIX.index`` + ``PREFIX.data-*``; pass the prefix, the ``.index``
  file or the directory), read without TensorFlow by ``tensorbundle.py``. TF keeps optimizer state as
  slot variables (``VAR/SLOT``) and exponential moving averages as ``VAR/ExponentialMovingAverage``:
  the slots are dropped and the EMA copy of a variable replaces it when there is one (``--no-ema``:
  the trained values).
* ``torch``: a ``.pth`` / ``.pt`` / ``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` file,
  unwrapped from ``state_dict`` / ``model`` (``state_dict_ema`` / ``model_ema`` first unless ``--no-ema``).

The tensors then go through the model family's ``checkpoint_filter_fn`` (the same conversion
``pretrained=True`` uses: official names and layouts to ours) and are loaded strictly into the model;
any missing, unexpected or mis-shaped key is an error that lists them. The file written is that model's
state dict; load it with ``pretrained_cfg_overlay=dict(file=OUTPUT)`` or ``AttnzooBackbone(checkpoint=OUTPUT)``.
"""
import argparse
from pathlib import Path
from typing import Callable, Dict, Tuple

import safetensors.torch
import torch
from timm.utils import ParseKwargs

import _checkpoints as checkpoints
import _models as models
import _runtime as runtime
from tensorbundle import TF_DTYPES, TensorBundle, TensorBundleError, resolve_checkpoint_prefix

TF_EMA_SLOT = 'ExponentialMovingAverage'
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('model', help='timm or attnzoo model name the weights are for, e.g. moat_0')
    p.add_argument('source', help='official checkpoint: TF prefix / .index / directory, or a .pth / .safetensors file')
    p.add_argument('output', help='safetensors file to write')
    p.add_argument('--format', choices=('auto', *READERS), default='auto', help='source format')
    p.add_argument('--no-ema', action='store_true',
                   help='take the trained weights, not their exponential moving average, where a checkpoint has both')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra create_model arguments, key=value (e.g. num_classes=21843)')
    return p


# ---------------------------------------------------------------- readers

def tf_model_variables(names, use_ema: bool = True) -> Tuple[Dict[str, str], Dict[str, int]]:
    """Which checkpoint tensor gives each model variable: ``{variable: tensor name}``, and counts of the
    variables, of those taken from their EMA, and of the tensors left out.

    ``VAR/ExponentialMovingAverage`` is the EMA of ``VAR`` (it stands for ``VAR`` when ``VAR`` itself is
    absent); any other ``VAR/SLOT`` where ``VAR`` is a variable is optimizer state.
    """
    names = set(names)
    ema_suffix = f'/{TF_EMA_SLOT}'
    variables = {n[:-len(ema_suffix)] if n.endswith(ema_suffix) else n for n in names}

    def is_slot(name: str) -> bool:
        parts = name.split('/')
        return any('/'.join(parts[:end]) in variables for end in range(1, len(parts)))

    chosen: Dict[str, str] = {}
    for variable in sorted(variables):
        if is_slot(variable):
            continue
        ema = variable + ema_suffix
        chosen[variable] = ema if ema in names and (use_ema or variable not in names) else variable
    counts = {'variables': len(chosen), 'ema': sum(n.endswith(ema_suffix) for n in chosen.values()),
              'left_out': len(names) - len(chosen)}
    return chosen, counts


def read_tf(path: str, use_ema: bool) -> Dict[str, torch.Tensor]:
    try:
        bundle = TensorBundle(path)
    except TensorBundleError as err:
        raise runtime.ToolError(str(err)) from err
    numeric = [name for name, entry in bundle.entries.items() if entry.dtype in TF_DTYPES]
    chosen, counts = tf_model_variables(numeric, use_ema)
    print(f'{bundle.prefix}: {len(bundle)} tensors; {counts["variables"]} variables '
          f'({counts["ema"]} from their EMA); {counts["left_out"]} optimizer slots and replaced copies left out')
    try:
        return {variable: bundle.read(name) for variable, name in chosen.items()}
    except TensorBundleError as err:
        raise runtime.ToolError(str(err)) from err


def read_torch(path: str, use_ema: bool) -> Dict[str, torch.Tensor]:
    return checkpoints.read_state_dict(path, use_ema=use_ema)


READERS: Dict[str, Callable[[str, bool], Dict[str, torch.Tensor]]] = {'tf': read_tf, 'torch': read_torch}


def detect_format(source: str) -> str:
    path = Path(source)
    if path.suffix in TORCH_SUFFIXES and path.is_file():
        return 'torch'
    try:
        prefix = resolve_checkpoint_prefix(path)
    except TensorBundleError as err:
        raise runtime.ToolError(str(err)) from err
    if Path(f'{prefix}.index').is_file():
        return 'tf'
    raise runtime.ToolError(
        f'{source} is neither a TensorFlow checkpoint (no {prefix}.index) nor a {"/".join(TORCH_SUFFIXES)} file')


# ---------------------------------------------------------------- conversion

def convert(model_name: str, source: str, output: str, fmt: str = 'auto', use_ema: bool = True,
            model_kwargs: Dict = None) -> Dict[str, torch.Tensor]:
    """Reads ``source``, converts it for ``model_name`` and writes ``output``; returns what was written."""
    fmt = detect_format(source) if fmt == 'auto' else fmt
    tensors = READERS[fmt](source, use_ema)
    model = models.create_model(model_name, num_classes=(model_kwargs or {}).get('num_classes', 1000),
                                model_kwargs={k: v for k, v in (model_kwargs or {}).items() if k != 'num_classes'})
    checkpoints.load_weights(model, tensors, source)
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state_dict, output, metadata={
        'format': 'pt', 'model': model_name, 'source': Path(source).name, 'source_format': fmt,
        'ema': str(use_ema)})
    print(f'wrote {output}: {len(state_dict)} tensors, {sum(v.numel() for v in state_dict.values()):,} values '
          f'for {model_name}')
    return state_dict


def main(argv=None):
    args = build_parser().parse_args(argv)
    convert(args.model, args.source, args.output, args.format, not args.no_ema, args.model_kwargs)


if __name__ == '__main__':
    runtime.run_cli(main)
