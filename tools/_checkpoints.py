"""Checkpoint files of the tools: a training run's directory, and reading weights of any origin.

A training run's directory holds ``model.safetensors`` (and ``ema.safetensors``),
``optimizer.safetensors`` and ``train_state.json``. Every file is written to a temporary file
in the same directory, fsynced, then renamed over the old one; the JSON goes last and names
the step that the tensor files were saved at, so a run killed while saving is detected.

Weights are read from those files or from an official checkpoint through attnzoo's one checkpoint path
(``attnzoo.backbones._checkpoint``: ``weights_only=True``, the same unwrapping and mismatch report as
the families' ``checkpoint_filter_fn``; the file verified first: CRCs, sizes, finite values), and loaded strictly, through the family's filter where their
keys are another layout.
"""
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Optional

import safetensors
import safetensors.torch
import torch

from attnzoo.backbones._checkpoint import (
    CheckpointError, UnsafeCheckpointError, compare_keys, load_checkpoint_file, unwrap_checkpoint,
    verify_checkpoint_archive)
from attnzoo.backbones._families import checkpoint_filter_of, family_of
from _runtime import ToolError

MODEL_FILE = 'model.safetensors'
EMA_FILE = 'ema.safetensors'
OPTIMIZER_FILE = 'optimizer.safetensors'
STATE_FILE = 'train_state.json'
STATE_FORMAT = 'attnzoo-train-state-v1'


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files_atomically(directory: Path, files: Dict[str, bytes]) -> None:
    """Writes every file to a temporary sibling and fsyncs it, then renames them in order.

    Each file is replaced whole or not at all; the renames come after all the slow writes, and
    the last file in ``files`` is the one that marks the set complete.
    """
    directory.mkdir(parents=True, exist_ok=True)
    temps = []
    for name, data in files.items():
        temp = directory / f'.{name}.tmp'  # one writer per run directory; a killed save's leftover is overwritten
        with open(temp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        temps.append((temp, directory / name))
    for temp, final in temps:
        os.replace(temp, final)
    _fsync_dir(directory)


def tensors_to_bytes(tensors: Dict[str, torch.Tensor], step: int) -> bytes:
    # copies: safetensors refuses tensors that share memory (tied weights, views)
    cpu = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(cpu, metadata={'format': 'pt', 'step': str(step)})


def _read_error(path: Path, err: Exception) -> ToolError:
    # torch's advice after the first sentence does not apply; some errors (EOFError) have no message
    reason = (str(err).strip().splitlines() or ['no message'])[0].split('. ')[0]
    return ToolError(f'cannot read checkpoint {path} ({type(err).__name__}: {reason}). The file is truncated, '
                     f'corrupt or not a safetensors/PyTorch checkpoint (PyTorch files are read with '
                     f'weights_only=True: tensors and plain containers only); re-download it or re-run the training')


def read_safetensors(path: Path, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a safetensors file; with ``step``, the file must have been saved at that step."""
    if not path.is_file():
        raise ToolError(f'checkpoint file {path} does not exist')
    try:
        verify_checkpoint_archive(path)
        with safetensors.safe_open(str(path), framework='pt') as f:
            saved_step = (f.metadata() or {}).get('step')
        tensors = safetensors.torch.load_file(str(path))
    except CheckpointError as err:
        raise ToolError(str(err)) from err
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise _read_error(path, err) from err
    if step is not None and saved_step != str(step):
        raise ToolError(f'{path} was saved at step {saved_step}, but {path.parent / STATE_FILE} at step {step}: '
                        f'the run was killed while writing its checkpoint and this directory cannot be resumed')
    return tensors


def read_checkpoint(path) -> object:
    """What the file at ``path`` holds: our ``.safetensors`` or an official ``.pth`` / ``.pth.tar`` / ``.pt`` /
    ``.bin``, read by attnzoo's one checkpoint path (``attnzoo.backbones._checkpoint``: torch files with
    ``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        raise ToolError(f'{path} is a directory; pass the weights file in it, e.g. {path / MODEL_FILE} or {path / EMA_FILE}')
    if not path.is_file():
        raise ToolError(f'checkpoint file {path} does not exist')
    try:
        return load_checkpoint_file(path)
    except (UnsafeCheckpointError, CheckpointError) as err:  # damaged, non-finite or unsafe: the error says which
        raise ToolError(str(err)) from err
    except Exception as err:  # torch.load and safetensors raise pickle, zip and runtime errors for damaged files
        raise _read_error(path, err) from err


def state_dict_of(checkpoint, path, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The weights of ``checkpoint`` (read from ``path``): under ``state_dict_ema`` / ``model_ema`` (with
    ``use_ema``), else ``state_dict`` / ``model``, else the checkpoint itself; DataParallel / torch.compile
    prefixes removed."""
    try:
        return unwrap_checkpoint(checkpoint, use_ema)
    except CheckpointError as err:
        raise ToolError(f'{path}: {err}') from err


def read_state_dict(path, use_ema: bool = True) -> Dict[str, torch.Tensor]:
    """The weights in the file at ``path`` (:func:`read_checkpoint`, :func:`state_dict_of`)."""
    return state_dict_of(read_checkpoint(path), path, use_ema)


def fit_to_model(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    """``state_dict`` with exactly ``model``'s keys and shapes: as it is where it fits, else converted by
    the model family's checkpoint filter (official layouts). Any mismatch raises a :class:`ToolError`
    that lists the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    model_name = model.pretrained_cfg['architecture']
    if compare_keys(state_dict, expected):
        filter_fn = checkpoint_filter_of(model_name)
        if filter_fn is not None:
            try:
                state_dict = filter_fn(state_dict, model)
            except Exception as err:  # a converter meeting another family's keys fails in its own way
                raise ToolError(f'{source} does not fit {model_name}: {family_of(model_name)}\'s checkpoint filter '
                                f'could not convert it ({type(err).__name__}: {err})') from err
    mismatch = compare_keys(state_dict, expected)
    if mismatch:
        raise ToolError(f'{source} does not fit {model_name} ({type(model).__module__}): {mismatch.describe()}. '
                        f'Check --model; a classifier trained on another dataset has another number of classes.')
    return state_dict


def load_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Loads ``state_dict`` strictly, through the family's checkpoint filter where its keys are another
    layout (:func:`fit_to_model`)."""
    model.load_state_dict(fit_to_model(model, state_dict, source), strict=True)


def read_train_state(run_dir) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise ToolError(f'{run_dir} holds no {STATE_FILE}; --resume takes the --output directory of a training run '
                        f'that finished at least one epoch')
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ToolError(f'{path} is corrupt ({err}); the run cannot be resumed') from err
    if state.get('format') != STATE_FORMAT:
        raise ToolError(f'{path} is not a training state written by tools/train.py (format {state.get("format")!r})')
    return state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    """The optimizer's per-parameter state, flattened to ``'<param index>.<name>'`` keys."""
    return {f'{index}.{name}': value
            for index, per_param in optimizer.state_dict()['state'].items()
            for name, value in per_param.items()}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], param_groups: Iterable[dict]) -> None:
    state: Dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split('.', 1)
        state.setdefault(int(index), {})[name] = value
    current = optimizer.param_groups
    # JSON turned tuples (AdamW's betas) into lists
    groups = [{k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in saved.items()}
              for saved, cur in zip(param_groups, current)]
    optimizer.load_state_dict({'state': state, 'param_groups': groups})
