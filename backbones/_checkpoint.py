"""The one checkpoint path of attnzoo: reading a checkpoint file, unwrapping its weights, renaming
official keys, and checking the result against a model.

Every family's ``checkpoint_filter_fn`` (through :func:`convert_checkpoint` or, for MOAT's TF variables,
:func:`check_checkpoint_keys`), ``tools/eval.py``, ``tools/convert.py`` and ``attnzoo.heads`` use these
functions, so a file gives the same weights, and a mismatch the same report, whichever way it is loaded.

Unwrapping (:func:`unwrap_checkpoint`): official training scripts save their weights under a key of a
dict: ``model`` (DeiT / Swin-style scripts: BiFormer, CrossFormer, NAT, LITv2, DAT++, TransNeXt),
``state_dict`` (timm's saver, mmengine), and their exponential moving average beside them as
``model_ema`` / ``state_dict_ema``. Where a file holds both, the model takes what its family's official
evaluation takes (:func:`checkpoint_use_ema`): the trained weights for BiFormer (``load_release``),
CrossFormer, DAT++, LITv2, NAT and TransNeXt, the EMA weights for CSWin (its timm-based ``main.py``
evaluates with ``use_ema``) and for timm's own families (timm's file loader's order). Every path applies
that one rule: ``pretrained=True`` and the families' filters, ``pretrained_cfg_overlay=dict(file=...)``
(:func:`file_through_family_filter`, :func:`load_pretrained_file`), ``AttnzooBackbone(checkpoint=...)``,
``tools/eval.py`` and ``tools/convert.py``. The ``module.`` prefix of (Distributed)DataParallel and
``_orig_mod.`` of ``torch.compile`` are removed.

Reading (:func:`load_checkpoint_file`): ``.safetensors`` files, or ``torch.load(weights_only=True)`` with
:data:`SAFE_CHECKPOINT_GLOBALS` allowed, so loading a file cannot run code; a file that needs any other
pickled object is refused with :class:`UnsafeCheckpointError`, which names the object.
"""
import argparse
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import safetensors.torch
import torch
import torch.nn as nn
from timm.models import load_pretrained, resolve_pretrained_cfg
from timm.models._input import get_model_traits

EMA_WRAPPERS = ('state_dict_ema', 'model_ema')
TRAINED_WRAPPERS = ('state_dict', 'model')
# (Distributed)DataParallel's, then torch.compile's; timm's clean_state_dict removes the same
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
# what official training scripts pickle beside the weights (BiFormer's and timm's saver: the training
# arguments), which holds only data
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]
LISTED_KEYS = 10  # keys named per kind of mismatch in an error message
# what torch.load(weights_only=True) says of an object it refuses to rebuild ('Unsupported global: ...',
# '... unsupported GLOBAL posix.system whose module posix is blocked'); a damaged file fails otherwise
_WEIGHTS_ONLY_REFUSAL = 'unsupported global'

StateDict = Dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that is not what the model needs; the message says what was wrong and what to do."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a pickled object that ``torch.load(weights_only=True)`` must not rebuild."""


def unsafe_checkpoint_error(filename, error: pickle.UnpicklingError, allowed: str) -> UnsafeCheckpointError:
    """The refusal of ``filename``, whose unpickling failed with ``error``; ``allowed`` says what such
    checkpoints may hold."""
    # torch re-raises the unpickler's reason (kept as the context) wrapped in advice (weights_only=False,
    # add_safe_globals) that this refusal exists to avoid
    reason = ' '.join(str(error.__context__ or error).split()).split(' Please use ')[0]
    return UnsafeCheckpointError(
        f'refused to load {filename}: it holds a pickled object that {allowed} do not hold ({reason}). attnzoo '
        f'loads checkpoints with torch.load(weights_only=True), so that loading a file cannot run code. If you '
        f'made the file yourself and trust it, load it with torch.load(path, weights_only=False) and save only '
        f'its tensors (e.g. its "state_dict").')


def load_checkpoint_file(path) -> Dict:
    """The contents of a ``.safetensors`` file, or of a PyTorch file loaded with ``weights_only=True``
    (tensors, plain containers and :data:`SAFE_CHECKPOINT_GLOBALS`); raises :class:`UnsafeCheckpointError`
    for a file that needs other pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint file {path} does not exist')
    if path.suffix == '.safetensors':
        return safetensors.torch.load_file(str(path))
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        if _WEIGHTS_ONLY_REFUSAL not in str(error).lower():  # a damaged file, not a refused object
            raise
        raise unsafe_checkpoint_error(path, error, 'weight checkpoints') from error


def _strip_wrapper_prefixes(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split('.', 1)[1]
    return key


def checkpoint_wrapper(checkpoint: Mapping, use_ema: bool = True) -> Optional[str]:
    """The key of ``checkpoint`` that :func:`unwrap_checkpoint` takes the weights from; None for a plain
    state dict. ``use_ema`` decides where a file holds both; a file with one kind gives that one."""
    for wrapper in EMA_WRAPPERS + TRAINED_WRAPPERS if use_ema else TRAINED_WRAPPERS + EMA_WRAPPERS:
        if isinstance(checkpoint.get(wrapper), Mapping):
            return wrapper
    return None


def unwrap_checkpoint(checkpoint: Mapping, use_ema: bool = True) -> StateDict:
    """The weights of a checkpoint: the first of :data:`EMA_WRAPPERS` and :data:`TRAINED_WRAPPERS` (the
    trained ones first without ``use_ema``) that holds a dict, else the checkpoint itself; without the
    :data:`WRAPPER_PREFIXES`. Raises :class:`CheckpointError` where that is not a dict of tensors."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'a checkpoint is a dict of tensors (or one under a key such as \'model\'), '
                              f'not a {type(checkpoint).__name__}')
    wrapper = checkpoint_wrapper(checkpoint, use_ema)
    if wrapper is not None:
        checkpoint = checkpoint[wrapper]
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f'the checkpoint is not a state dict of tensors (entries {not_tensors[:LISTED_KEYS]} are not tensors) '
            f'and holds none under {", ".join(map(repr, EMA_WRAPPERS + TRAINED_WRAPPERS))}; '
            f'save the model\'s state_dict(), or the training checkpoint that holds it')
    return {_strip_wrapper_prefixes(k): v for k, v in checkpoint.items()}


def checkpoint_use_ema(model: nn.Module) -> bool:
    """Whether ``model`` takes the EMA weights of a file that holds both trained and EMA weights: its
    family's official choice (the model's ``checkpoint_ema``); a model that does not say takes the EMA
    weights, as timm's file loader does."""
    return getattr(model, 'checkpoint_ema', True)


def file_through_family_filter(kwargs: Dict) -> Dict:
    """A family's create-function ``kwargs`` with a ``pretrained_cfg_overlay`` file left to the model's
    ``load_pretrained`` (timm's ``custom_load``), which is :func:`load_pretrained_file`: timm's own file
    loader would take the EMA weights out of the file before the family's filter sees it."""
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    if overlay.get('file') and 'custom_load' not in overlay:
        kwargs = dict(kwargs, pretrained_cfg_overlay=dict(overlay, custom_load=True))
    return kwargs


def load_pretrained_file(model: nn.Module, path, filter_fn: Callable[[StateDict, nn.Module], StateDict]) -> None:
    """Loads the checkpoint file at ``path`` into ``model`` through its family's ``filter_fn``, which gets
    the whole file (wrappers included, read by :func:`load_checkpoint_file`) and unwraps it by the
    family's rule; the rest (classifier and input-channel adaptation, strict key check) is timm's loading."""
    cfg = dict(model.pretrained_cfg, state_dict=load_checkpoint_file(path), custom_load=False)
    load_pretrained(model, cfg, num_classes=model.num_classes, in_chans=model.in_chans, filter_fn=filter_fn)


def listed(items: Sequence[str], limit: int = LISTED_KEYS) -> str:
    """The first ``limit`` of ``items``, comma-separated, and how many more there are."""
    more = f', ... ({len(items) - limit} more)' if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


@dataclass
class KeyMismatch:
    """How a state dict differs from the one a model expects."""
    missing: List[str]  # the model has them, the checkpoint does not
    unexpected: List[str]  # the checkpoint has them, the model does not
    shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]  # (key, checkpoint shape, model shape)
    matched: int  # keys in both, of the same shape

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    @property
    def fit(self) -> float:
        """The share of all keys that match: 1.0 for a checkpoint of this model, near 0 for another family's."""
        return self.matched / max(1, self.matched + len(self.missing) + len(self.unexpected) + len(self.shapes))

    def describe(self) -> str:
        """One line: each kind of mismatch, counted, with the first keys of each named."""
        shapes = [f'{k}: checkpoint {tuple(c)} vs model {tuple(m)}' for k, c, m in self.shapes]
        parts = []
        for title, items in (('missing keys (in the model, not in the checkpoint)', self.missing),
                             ('unexpected keys (in the checkpoint, not in the model)', self.unexpected),
                             ('shape mismatches', shapes)):
            if items:
                parts.append(f'{len(items)} {title} {listed(items)}')
        return '; '.join(parts)


def compare_keys(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                 ignore_prefixes: Tuple[str, ...] = (), any_shape: Sequence[str] = ()) -> KeyMismatch:
    """How ``state_dict`` differs from ``expected`` (a model's state dict), leaving out keys that start
    with one of ``ignore_prefixes``; the keys in ``any_shape`` may have any shape."""
    ours = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else state_dict
    theirs = {k: v for k, v in expected.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else expected
    common = [k for k in theirs if k in ours]
    shapes = [(k, tuple(ours[k].shape), tuple(theirs[k].shape)) for k in common
              if ours[k].shape != theirs[k].shape and k not in any_shape]
    return KeyMismatch(missing=sorted(k for k in theirs if k not in ours),
                       unexpected=sorted(k for k in ours if k not in theirs),
                       shapes=sorted(shapes), matched=len(common) - len(shapes))


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not fit the model; ``mismatch`` holds the details and
    ``state_dict`` the checkpoint as converted (to tell which model it is for)."""

    def __init__(self, mismatch: KeyMismatch, model_name: str, hint: str, state_dict: Mapping[str, torch.Tensor]):
        super().__init__(f'checkpoint does not match {model_name}: {mismatch.describe()}; {hint}')
        self.mismatch = mismatch
        self.state_dict = state_dict


def check_checkpoint_keys(state_dict: Mapping[str, torch.Tensor], model: nn.Module, hint: str,
                          ignore_prefixes: Tuple[str, ...] = ('head.',)):
    """Raises :class:`CheckpointMismatchError` naming the missing, unexpected and mis-shaped keys of
    ``state_dict`` for ``model``; ``hint`` ends the message (what to check, what to do).

    By default classifier keys may differ: timm drops or re-creates the head when num_classes changes. The
    input convolutions' weights (the model's ``first_conv``, as timm's loader finds it) may have another
    number of input channels: timm's loader adapts them to the model's ``in_chans``.
    """
    pretrained_cfg = getattr(model, 'pretrained_cfg', {})
    first_convs = get_model_traits(model).get('first_conv', pretrained_cfg.get('first_conv')) or ()
    first_convs = (first_convs,) if isinstance(first_convs, str) else first_convs
    mismatch = compare_keys(state_dict, model.state_dict(), ignore_prefixes,
                            any_shape=[f'{name}.weight' for name in first_convs])
    if mismatch:
        raise CheckpointMismatchError(mismatch, type(model).__name__, hint, state_dict)


def convert_checkpoint(
        state_dict: Mapping,
        model: nn.Module,
        convert_official_key: Callable[[str], str],
        hint: str,
        adapt: Optional[Callable[[StateDict, nn.Module], StateDict]] = None,
) -> StateDict:
    """The body of a family's ``checkpoint_filter_fn``: unwraps the checkpoint, renames official keys
    with ``convert_official_key`` (our own state dict, whose keys start with 'stem.', passes through)
    and checks the result against ``model`` (:func:`check_checkpoint_keys`, ending with ``hint``).
    ``adapt``, if given, runs first on the renamed state dict and returns it fitted to the model (layout
    changes, resized tables) or raises a family-specific error (e.g. which model option it needs).
    A file holding both trained and EMA weights gives the ones :func:`checkpoint_use_ema` names."""
    state_dict = unwrap_checkpoint(state_dict, checkpoint_use_ema(model))
    if not any(k.startswith('stem.') for k in state_dict):
        state_dict = {convert_official_key(k): v for k, v in state_dict.items()}
    if adapt is not None:
        state_dict = adapt(state_dict, model)
    check_checkpoint_keys(state_dict, model, hint)
    return state_dict


# (regex, replacement: a string or a function of the match), as re.sub takes them
RenameRule = Tuple[str, Union[str, Callable[[re.Match], str]]]


def rename_by_first_rule(key: str, rules: Sequence[RenameRule]) -> str:
    """``key`` renamed by the first of ``rules`` whose pattern matches it; unchanged if none does."""
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def require_downloadable_weights(variant: str, kwargs: Dict, is_share_page: Callable[[str], bool],
                                 also_at: str = '', where: str = 'a share page', prepare: str = 'Download the file',
                                 file_name: str = '/path/to/file.pth') -> None:
    """Official weights that timm cannot load from their URL: share pages (Google Drive, BaiduCloud,
    OneDrive, TsinghuaCloud), or archives that need converting (``where``, ``prepare``: what to do first,
    ``file_name``: the file it gives). ``pretrained=True`` without a local file (or another source) says
    where they are and how to load a prepared file, instead of failing on an HTML page or an archive.
    ``also_at`` names other mirrors. ``kwargs`` are the create function's (``pretrained_cfg`` may be a
    tag, as ``create_model('name.tag')`` passes it)."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    if cfg.file or cfg.hf_hub_id or cfg.state_dict or not is_share_page(cfg.url or ''):
        return
    raise RuntimeError(
        f'{variant}: the official weights are only on {where} ({cfg.url}{also_at}), which cannot be '
        f'loaded automatically. {prepare} and load it with timm.create_model({variant!r}, '
        f"pretrained=True, pretrained_cfg_overlay=dict(file='{file_name}')), or in an OpenMMLab config "
        f"with AttnzooBackbone(model_name={variant!r}, checkpoint='{file_name}').")
