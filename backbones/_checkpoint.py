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

Verifying (:func:`verify_checkpoint_archive`, before reading; :func:`refuse_nonfinite_tensors`, after): torch
reads a damaged zip archive without checking its records' CRC-32 (4 KB of flipped bytes load as 1,024
changed weights), and safetensors has no checksums, so the file is checked first: empty, the CRC of every
record of a zip archive, the header and byte sizes of a safetensors file. PyTorch's legacy (pre-1.6,
non-zip) format carries no checksums: it loads with a warning saying so. A file holding NaN or Inf values
is refused, naming the tensors.
"""
import argparse
import json
import math
import pickle
import re
import warnings
import zipfile
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
    for a file that needs other pickled objects, and :class:`CheckpointError` for a damaged file
    (:func:`verify_checkpoint_archive`) or one that holds non-finite values (:func:`refuse_nonfinite_tensors`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint file {path} does not exist')
    verify_checkpoint_archive(path)
    if path.suffix == '.safetensors':
        checkpoint = safetensors.torch.load_file(str(path))
    else:
        try:
            with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
                checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as error:
            if _WEIGHTS_ONLY_REFUSAL not in str(error).lower():  # a damaged file, not a refused object
                raise
            raise unsafe_checkpoint_error(path, error, 'weight checkpoints') from error
    refuse_nonfinite_tensors(checkpoint, path)
    return checkpoint


# the first bytes of PyTorch's legacy format: pickle protocol 2, then the pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_TORCH_MAGIC = b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19'
_ZIP_RECORD_SIGNATURE = b'PK\x03\x04'  # what a zip archive starts with
_SAFETENSORS_ITEMSIZE = {'BOOL': 1, 'U8': 1, 'I8': 1, 'F8_E5M2': 1, 'F8_E4M3': 1, 'I16': 2, 'U16': 2, 'F16': 2,
                         'BF16': 2, 'I32': 4, 'U32': 4, 'F32': 4, 'I64': 8, 'U64': 8, 'F64': 8}
_READ_CHUNK = 1 << 24


def verify_checkpoint_archive(path) -> None:
    """Checks the file at ``path`` before it is read: not empty; a ``.safetensors`` file's header and the
    byte size of every tensor (:func:`verify_safetensors`); a PyTorch file's zip records against their
    CRC-32 (:func:`verify_zip_records`). PyTorch's legacy format, which has no checksums, loads with a
    warning. Raises :class:`CheckpointError` saying what is wrong and what to do."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f'checkpoint file {path} is empty (0 bytes): its download or copy did not complete; '
                              f'download or copy it again')
    with path.open('rb') as f:
        start = f.read(len(_LEGACY_TORCH_MAGIC))
    if path.suffix == '.safetensors':
        verify_safetensors(path)
    elif zipfile.is_zipfile(path):
        verify_zip_records(path)
    elif start.startswith(_ZIP_RECORD_SIGNATURE):
        raise CheckpointError(f'{path} is a truncated zip archive (torch.save\'s format): its table of records, at the '
                              f'end, is missing; download or copy it again')
    elif start == _LEGACY_TORCH_MAGIC:
        warnings.warn(
            f'{path} is in PyTorch\'s legacy (pre-1.6, non-zip) format, which has no checksums: damage to it cannot '
            f'be detected. Re-save it as a checked file: torch.save(torch.load(path, weights_only=True), new_path)')
    else:
        raise CheckpointError(
            f'{path} is not a checkpoint attnzoo reads: neither a zip archive (torch.save) nor PyTorch\'s legacy '
            f'format, and its name does not end in .safetensors; it may be damaged or an HTML page saved by a '
            f'failed download: download it again')


def verify_zip_records(path) -> None:
    """Reads every record of the zip archive (``torch.save``'s format) at ``path`` and checks its CRC-32,
    which ``torch.load`` does not; raises :class:`CheckpointError` naming the damaged records."""
    damaged = []
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            for record in records:
                try:
                    with archive.open(record) as data:
                        while data.read(_READ_CHUNK):
                            pass
                except (zipfile.BadZipFile, EOFError, OSError):
                    damaged.append(record.filename)
    except zipfile.BadZipFile as error:
        raise CheckpointError(f'{path} is a damaged zip archive ({error}): download or copy it again') from error
    if damaged:
        raise CheckpointError(
            f'{path} is damaged: the CRC-32 check fails for {len(damaged)} of its {len(records)} zip records '
            f'({listed(damaged)}); loading it would give wrong weights. Download or copy it again')


def verify_safetensors(path) -> None:
    """Checks the header of the safetensors file at ``path`` and that its tensors' byte ranges, each the size
    its dtype and shape make, tile the rest of the file; raises :class:`CheckpointError` saying what differs."""
    size = path.stat().st_size
    with path.open('rb') as f:
        prefix = f.read(8)
        header_size = int.from_bytes(prefix, 'little') if len(prefix) == 8 else -1
        if not 0 < header_size <= size - 8:
            raise CheckpointError(
                f'{path} is not a complete safetensors file: it is {size} bytes, too short for the header its first '
                f'bytes announce; it is truncated or not a safetensors file: download or convert it again')
        try:
            header = json.loads(f.read(header_size))
        except (UnicodeDecodeError, ValueError) as error:
            raise CheckpointError(f'{path} has a damaged safetensors header ({error}): download or convert it '
                                  f'again') from error
    if not isinstance(header, dict):
        raise CheckpointError(f'{path} has a damaged safetensors header (not a JSON object): download or convert it again')
    ranges, wrong = [], []
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        try:
            begin, end = entry['data_offsets']
            shape, dtype = list(entry['shape']), entry['dtype']
        except (KeyError, TypeError, ValueError):
            wrong.append(f'{name} (entry {entry!r})')
            continue
        expected = _SAFETENSORS_ITEMSIZE[dtype] * math.prod(shape) if dtype in _SAFETENSORS_ITEMSIZE else end - begin
        if end - begin != expected:
            wrong.append(f'{name} ({end - begin} bytes for {dtype} {shape}, which take {expected})')
        ranges.append((begin, end))
    data_size = size - 8 - header_size
    if wrong:
        raise CheckpointError(f'{path} has a damaged safetensors header: {listed(wrong)}; download or convert it again')
    ranges.sort()
    tiled = all(a_end == b_begin for (_, a_end), (b_begin, _) in zip(ranges, ranges[1:]))
    if not tiled or (ranges and (ranges[0][0] != 0 or ranges[-1][1] != data_size)) or (not ranges and data_size):
        described = ranges[-1][1] if ranges else 0
        raise CheckpointError(
            f'{path} is damaged: its header describes {described} bytes of tensor data, the file holds {data_size}'
            + (' (truncated)' if described > data_size else '') + '; download or convert it again')


def nonfinite_tensors(checkpoint, prefix: str = '') -> List[str]:
    """The names (dotted paths through nested dicts and lists) of the floating-point tensors in
    ``checkpoint`` that hold a NaN or an infinity."""
    if isinstance(checkpoint, torch.Tensor):
        finite = not (checkpoint.is_floating_point() or checkpoint.is_complex()) or bool(checkpoint.isfinite().all())
        return [] if finite else [prefix or '<tensor>']
    if isinstance(checkpoint, Mapping):
        items = checkpoint.items()
    elif isinstance(checkpoint, (list, tuple)):
        items = enumerate(checkpoint)
    else:
        return []
    return [name for key, value in items for name in nonfinite_tensors(value, f'{prefix}.{key}' if prefix else str(key))]


def refuse_nonfinite_tensors(checkpoint, source) -> None:
    """Raises :class:`CheckpointError` naming the tensors of ``checkpoint`` (read from ``source``) that hold
    NaN or Inf: weights a diverged run saved, which give non-finite outputs for every input."""
    names = nonfinite_tensors(checkpoint)
    if names:
        raise CheckpointError(
            f'{source} holds non-finite values (NaN or Inf) in {len(names)} tensors: {listed(names)}. It was saved '
            f'by a diverged training run or is damaged; use an earlier checkpoint of that run, or retrain with a '
            f'lower learning rate')


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
        rebuilt: Optional[re.Pattern] = None,
) -> StateDict:
    """The body of a family's ``checkpoint_filter_fn``: unwraps the checkpoint, drops the official buffers
    the model rebuilds itself (keys that ``rebuilt`` finds, if given), renames official keys
    with ``convert_official_key`` (our own state dict, whose keys start with 'stem.', passes through)
    and checks the result against ``model`` (:func:`check_checkpoint_keys`, ending with ``hint``).
    ``adapt``, if given, runs first on the renamed state dict and returns it fitted to the model (layout
    changes, resized tables) or raises a family-specific error (e.g. which model option it needs).
    A file holding both trained and EMA weights gives the ones :func:`checkpoint_use_ema` names."""
    state_dict = unwrap_checkpoint(state_dict, checkpoint_use_ema(model))
    if rebuilt is not None:
        state_dict = {k: v for k, v in state_dict.items() if not rebuilt.search(k)}
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


def rename_by_every_rule(key: str, rules: Sequence[RenameRule]) -> str:
    """``key`` renamed by each of ``rules`` in order, each applied to the result of the previous one."""
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
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


def pretrained_weights_source(variant: str, kwargs: Dict) -> str:
    """Where ``timm.create_model(variant, pretrained=True, **kwargs)`` fetches its weights from (a URL or the
    Hugging Face Hub's page), for a message about a failed download."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    return f'https://huggingface.co/{cfg.hf_hub_id}' if cfg.hf_hub_id else cfg.url or cfg.file or '(no source)'
