"""Converts an official checkpoint of any family attnzoo supports into a safetensors file for its model.

    python tools/convert.py biformer_small_in1k.pth --model biformer_small -o biformer_small.safetensors
    python tools/convert.py moat0_imagenet_1k_224_w_position_embedding --model moat_0 -o moat_0.safetensors

then (after ``import attnzoo.backbones``) ``timm.create_model('biformer_small', pretrained=True,
pretrained_cfg_overlay=dict(file='biformer_small.safetensors'))`` or ``AttnzooBackbone(checkpoint=...)`` loads it.

The source format is detected (``--format`` overrides it), and each format has a reader:

* ``torch``: a ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.bin`` file, read with ``torch.load(weights_only=True)`` (a
  file that needs pickled code is refused; the training arguments official scripts save beside the
  weights are allowed), or a ``.safetensors`` file. The weights are taken as every attnzoo loader takes
  them: from ``state_dict`` / ``model`` or ``state_dict_ema`` / ``model_ema``, of a file holding both the
  ones the family's official evaluation takes (``attnzoo.backbones._checkpoint.checkpoint_use_ema``;
  ``--ema`` / ``--no-ema`` choose), else the file itself; DataParallel's ``module.`` prefix is removed.
* ``tf``: a TensorFlow checkpoint (MOAT; ``PREFIX.index`` + ``PREFIX.data-*``; pass the prefix, the ``.index``
  file or the directory), read without TensorFlow by ``tensorbundle.py``. TF keeps optimizer state as
  slot variables (``VAR/SLOT``) and exponential moving averages as ``VAR/ExponentialMovingAverage``:
  the slots are dropped and the EMA copy of a variable replaces it when there is one (the same rule:
  MOAT's is the EMA copy; ``--no-ema``: the trained values).

The tensors then go through the family's checkpoint filter (``checkpoint_filter_fn``: the conversion
``pretrained=True`` uses, official names and layouts to ours; timm's own for MaxViT, DaViT, SHViT and
HaloNet) and must then fit the model exactly. The model is built on the meta device (its shapes only),
so converting costs no initialisation. A summary of the mapping is printed. A file that does not fit is
refused with the missing, unexpected and mis-shaped keys, and the family (and variant) it looks like.
The file written holds exactly the model's state dict, in its dtypes; its SHA-256 is printed and written
beside it as ``OUTPUT.sha256`` (``sha256sum -c OUTPUT.sha256`` checks a copy). The source is verified before
it is converted: the CRC-32 of every record of a PyTorch zip archive, a safetensors header and sizes, and
finite values (a damaged or diverged file is refused, naming what is wrong).
"""
import argparse
import hashlib
import re
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import safetensors.torch
import torch
from timm.utils import ParseKwargs
from torch.utils._python_dispatch import TorchDispatchMode

from attnzoo.backbones._checkpoint import (
    CheckpointMismatchError, checkpoint_use_ema, checkpoint_wrapper, compare_keys, listed)
from attnzoo.backbones._families import checkpoint_filter_of, family_of, supported_families
import _checkpoints as checkpoints
import _models as models
import _runtime as runtime
from tensorbundle import TF_DTYPES, TensorBundle, TensorBundleError, resolve_checkpoint_prefix

TF_EMA_SLOT = 'ExponentialMovingAverage'
TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.bin', '.safetensors')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('source', help='official checkpoint: a .pth / .pth.tar / .safetensors file, '
                                  'or a TF prefix / .index / directory')
    p.add_argument('--model', required=True, help='timm or attnzoo model name the weights are for, e.g. biformer_small')
    p.add_argument('-o', '--output', default=None, help='safetensors file to write (default: MODEL.safetensors)')
    p.add_argument('--format', choices=('auto', *READERS), default='auto', help='source format')
    p.add_argument('--ema', dest='use_ema', action=argparse.BooleanOptionalAction, default=None,
                   help='where a checkpoint has both, take the exponential moving average or (--no-ema) the trained '
                        'weights; default: what the family\'s official evaluation takes')
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
    checkpoint = checkpoints.read_checkpoint(path)
    state_dict = checkpoints.state_dict_of(checkpoint, path, use_ema)
    wrapper = checkpoint_wrapper(checkpoint, use_ema)
    print(f'{path}: {len(state_dict)} tensors' + (f" under '{wrapper}'" if wrapper else ''))
    return state_dict


READERS: Dict[str, Callable[[str, bool], Dict[str, torch.Tensor]]] = {'tf': read_tf, 'torch': read_torch}


def detect_format(source: str) -> str:
    path = Path(source)
    if path.name.endswith(TORCH_SUFFIXES) and path.is_file():
        return 'torch'
    try:
        prefix = resolve_checkpoint_prefix(path)
    except TensorBundleError as err:
        raise runtime.ToolError(str(err)) from err
    if Path(f'{prefix}.index').is_file():
        return 'tf'
    raise runtime.ToolError(
        f'{source} is neither a TensorFlow checkpoint (no {prefix}.index) nor a {"/".join(TORCH_SUFFIXES)} file')


# ---------------------------------------------------------------- which model a checkpoint is for

MIN_FAMILY_FIT = 0.5  # the share of layer names a file must have in common with a family to look like its
SURE_FAMILY_FIT = 0.9


class _NoInPlaceOps(TorchDispatchMode):
    """Skips in-place ops (weight initialisation) on meta tensors, which have no values to change but
    whose shape checks in torch's Python meta kernels cost most of a meta model's build."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.is_mutable and func is not torch.ops.aten.resize_.default:
            return args[0]
        return func(*args, **(kwargs or {}))


def build_on_meta(model_name: str, model_kwargs: Optional[Dict] = None) -> torch.nn.Module:
    """``model_name`` with its parameters' shapes only: what conversion needs, with no initialisation."""
    kwargs = dict(model_kwargs or {})
    with torch.device('meta'), _NoInPlaceOps():
        return models.create_model(model_name, num_classes=kwargs.pop('num_classes', 1000), model_kwargs=kwargs)


def converted_for(tensors: Dict[str, torch.Tensor], model: torch.nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """``tensors`` through the model family's checkpoint filter, whether they fit the model or not; None
    where the filter cannot convert them at all."""
    filter_fn = checkpoint_filter_of(model.pretrained_cfg['architecture'])
    try:
        return tensors if filter_fn is None else filter_fn(dict(tensors), model)
    except CheckpointMismatchError as err:
        return err.state_dict
    except Exception:  # a filter meeting another family's keys fails in its own way
        return None


def _key_patterns(keys) -> set:
    # block and stage numbers left out: the variants of a family differ in depth, not in their layers' names
    return {re.sub(r'(?<=\.)\d+(?=\.|$)', 'N', k) for k in keys if not k.startswith('head.')}


def family_fit(converted: Optional[Dict[str, torch.Tensor]], model: torch.nn.Module) -> float:
    """The share of layer names (blocks' numbers and classifiers left out) that the converted checkpoint
    and the model have in common: near 1 for any variant of the checkpoint's family, low for others."""
    if converted is None:
        return 0.
    ours, theirs = _key_patterns(converted), _key_patterns(model.state_dict())
    return len(ours & theirs) / max(1, len(ours | theirs))


def fits_exactly(converted: Optional[Dict[str, torch.Tensor]], model: torch.nn.Module) -> bool:
    """Every key and shape matches, classifiers left out (their size is the dataset's)."""
    return converted is not None and not compare_keys(converted, model.state_dict(), ignore_prefixes=('head.',))


def likely_model(tensors: Dict[str, torch.Tensor], model_name: str, model_kwargs: Optional[Dict] = None) -> str:
    """A sentence naming the family (and, where some fit exactly, the variants) that ``tensors`` look like;
    ``model_name`` is built with ``model_kwargs``, the other variants with their defaults."""
    models_built = {}

    def built(name):
        if name not in models_built:
            models_built[name] = build_on_meta(name, model_kwargs if name == model_name else None)
        return models_built[name]

    def fit_to_family(name):
        model = built(name)
        return family_fit(converted_for(tensors, model), model)

    own_family = family_of(model_name)
    family_fits = {own_family: fit_to_family(model_name)}
    for family, variants in supported_families().items():  # each costs a model build: stop at a sure one
        if max(family_fits.values()) < SURE_FAMILY_FIT and family not in family_fits:
            family_fits[family] = fit_to_family(variants[0])
    family, fit = max(family_fits.items(), key=lambda item: item[1])
    if fit < MIN_FAMILY_FIT:
        return (f'It does not look like a checkpoint of any family attnzoo supports (the closest, {family}, '
                f'shares {fit:.0%} of its layer names); is it a classification checkpoint?')
    exact = []
    for variant in supported_families().get(family, [model_name]):
        model = built(variant)
        if fits_exactly(converted_for(tensors, model), model):
            exact.append(variant)
    which = ' or '.join(f'--model {v}' for v in exact)
    if family != own_family:
        return (f'It looks like a {family} checkpoint, not one of {own_family} ({model_name}): convert it with '
                + (which or f'the {family} variant it was trained as ({", ".join(supported_families()[family])})')
                + '.')
    if model_name in exact:
        return (f'Its layers fit {model_name}; only its classifier differs: give the number of classes it was '
                f'trained for, --model-kwargs num_classes=N.')
    if exact:
        return f'It is a checkpoint of another {family} variant: convert it with {which}.'
    return (f'It looks like a {family} checkpoint, but no {family} variant fits it exactly: check the variant '
            f'and the options in --model-kwargs.')


# ---------------------------------------------------------------- conversion

def mapping_summary(tensors: Dict[str, torch.Tensor], converted: Dict[str, torch.Tensor]) -> str:
    """Which source tensors kept their name, were renamed, or were not carried over as they are (dropped,
    or reshaped / merged into others); filters rename by passing the same tensor objects on."""
    source_key = {id(v): k for k, v in tensors.items()}
    origin = {k: source_key.get(id(v)) for k, v in converted.items()}
    renamed = [f'{source} -> {k}' for k, source in origin.items() if source not in (None, k)]
    kept = sum(1 for k, source in origin.items() if source == k)
    left = sorted(set(tensors) - set(origin.values()))
    return (f'  {kept} tensors kept their name, {len(renamed)} renamed ({listed(renamed, 3)})\n'
            f'  {len(converted) - kept - len(renamed)} model tensors made by the filter (reshaped, merged or split); '
            f'{len(left)} source tensors not carried over as they are' + (f' ({listed(left)})' if left else ''))


def convert(model_name: str, source: str, output: Optional[str] = None, fmt: str = 'auto',
            use_ema: Optional[bool] = None, model_kwargs: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
    """Reads ``source``, converts it for ``model_name`` and writes ``output`` (default:
    ``MODEL.safetensors``); returns what was written. ``use_ema`` None: the family's rule."""
    output = output or f'{model_name}.safetensors'
    fmt = detect_format(source) if fmt == 'auto' else fmt
    model = build_on_meta(model_name, model_kwargs)
    use_ema = checkpoint_use_ema(model) if use_ema is None else use_ema
    tensors = READERS[fmt](source, use_ema)
    try:
        converted = checkpoints.fit_to_model(model, tensors, source)
    except runtime.ToolError as err:
        raise runtime.ToolError(f'{err}\n{likely_model(tensors, model_name, model_kwargs)}') from err
    print(f'{family_of(model_name)} checkpoint filter: {len(tensors)} source tensors -> {len(converted)} '
          f'for {model_name}')
    print(mapping_summary(tensors, converted))
    print('  missing keys: none; unexpected keys: none; shape mismatches: none')
    expected = model.state_dict()
    state_dict = {k: v.to(expected[k].dtype).contiguous() for k, v in converted.items()}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state_dict, output, metadata={
        'format': 'pt', 'model': model_name, 'source': Path(source).name, 'source_format': fmt,
        'ema': str(use_ema)})
    digest = write_sha256(Path(output))
    print(f'wrote {output}: {len(state_dict)} tensors, {sum(v.numel() for v in state_dict.values()):,} values '
          f'for {model_name}; SHA-256 {digest} (in {output}.sha256)')
    return state_dict


def write_sha256(path: Path) -> str:
    """Writes ``PATH.sha256`` in ``sha256sum``'s format (``sha256sum -c`` checks a copy against it) and returns
    the digest: safetensors files carry no checksum of their own."""
    digest = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            digest.update(chunk)
    path.with_name(path.name + '.sha256').write_text(f'{digest.hexdigest()}  {path.name}\n')
    return digest.hexdigest()


def main(argv=None):
    args = build_parser().parse_args(argv)
    convert(args.model, args.source, args.output, args.format, args.use_ema, args.model_kwargs)


if __name__ == '__main__':
    runtime.run_cli(main)
