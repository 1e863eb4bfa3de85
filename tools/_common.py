"""What tools/train.py and tools/eval.py share: data sources, models, checkpoints, distributed setup.

Data sources (``--dataset``):

* ``digits``: scikit-learn's handwritten digits (1797 grayscale 8x8 images, 10 classes), which
  ship inside scikit-learn, so the tools run with no download. A fixed stratified 80/20 split
  (seed 0, independent of ``--seed``) gives 1437 training and 360 validation images. Images are
  upsampled bilinearly to ``--img-size`` and replicated to three channels, so every model,
  pretrained RGB weights and official checkpoints included, takes them unchanged; they are
  normalised with the model's own mean and std. No augmentation.
* a directory: an ImageFolder root with one folder per split (``ROOT/train/<class>/*.jpg``,
  ``ROOT/val/<class>/*.jpg``), transformed by timm's ``create_transform`` with the model's
  data config.

Checkpoints: a training run's directory holds ``model.safetensors`` (and ``ema.safetensors``),
``optimizer.safetensors`` and ``train_state.json``. Every file is written to a temporary file
in the same directory, fsynced, then renamed over the old one; the JSON goes last and names
the step that the tensor files were saved at, so a run killed while saving is detected.
"""
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional

import numpy as np
import safetensors
import safetensors.torch
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config
from timm.models import clean_state_dict
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from tqdm import tqdm

from attnzoo.backbones import close_model_names  # importing it registers every attnzoo family with timm

DIGITS = 'digits'
DIGITS_IMG_SIZE = 32  # 4x the 8x8 originals: enough for a transformer's stride-4 stem, cheap on a CPU
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2

MODEL_FILE = 'model.safetensors'
EMA_FILE = 'ema.safetensors'
OPTIMIZER_FILE = 'optimizer.safetensors'
STATE_FILE = 'train_state.json'
STATE_FORMAT = 'attnzoo-train-state-v1'


class ToolError(ValueError):
    """A bad input the user can fix; the command-line tools print it without a traceback."""


def run_cli(main):
    """Runs ``main()`` and turns a :class:`ToolError` into a one-line message and exit status 1."""
    try:
        main()
    except ToolError as err:
        sys.exit(f'error: {err}')


# ----------------------------------------------------------------------------------------------
# distributed setup


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(device: str) -> DistInfo:
    """Joins the process group when launched by torchrun (RANK/WORLD_SIZE set), else one process.

    Under torchrun, ``--device cuda`` means this process's GPU (``cuda:LOCAL_RANK``, NCCL);
    ``--device cpu`` runs every process on the CPU (gloo).
    """
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise ToolError(f'--device {device} asked for, but torch sees no CUDA device; pass --device cpu')
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return DistInfo(rank=0, world_size=1, device=torch.device(device))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if device.startswith('cuda'):
        torch_device = torch.device('cuda', local_rank)
        torch.cuda.set_device(torch_device)
        backend = 'nccl'
    else:
        torch_device = torch.device(device)
        backend = 'gloo'
    dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=torch_device)


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def seed_everything(*entropy: int) -> None:
    """Seeds python, numpy and torch (every device) from a hash of ``entropy``."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(enabled: bool, name: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: None without AMP; bfloat16 on CPU and float16 on CUDA unless named."""
    if not enabled:
        return None
    if name is None:
        return torch.float16 if device.type == 'cuda' else torch.bfloat16
    return {'float16': torch.float16, 'bfloat16': torch.bfloat16}[name]


# ----------------------------------------------------------------------------------------------
# models


def unknown_model_message(name: str) -> str:
    close = close_model_names(name)
    hint = f' Close names: {", ".join(close)}.' if close else ''
    return (f'unknown model {name!r}: neither timm nor attnzoo registers it.{hint} '
            f"List names with: python -c \"import attnzoo.backbones, timm; print(timm.list_models('*pattern*'))\"")


def create_model(name: str, num_classes: int, pretrained: bool = False,
                 pretrained_file: Optional[str] = None, drop_path_rate: Optional[float] = None,
                 model_kwargs: Optional[dict] = None) -> torch.nn.Module:
    """A timm/attnzoo classifier with ``num_classes`` outputs.

    ``pretrained_file`` initialises from a local checkpoint through timm's pretrained loader,
    which runs the family's ``checkpoint_filter_fn`` and drops a classifier of another size.
    """
    if not timm.is_model(name):
        raise ToolError(unknown_model_message(name))
    kwargs = dict(model_kwargs or {})
    if drop_path_rate is not None:
        kwargs['drop_path_rate'] = drop_path_rate
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise ToolError(f'--pretrained-file {pretrained_file} does not exist')
        kwargs['pretrained_cfg_overlay'] = dict(file=str(pretrained_file))
        pretrained = True
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------
# data


def _load_digits_split(split: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION, stratify=labels,
        random_state=DIGITS_SPLIT_SEED)
    idx = {'train': train_idx, 'val': val_idx}[split]
    return images[idx], labels[idx]


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits of one split, upsampled to ``img_size``, three channels, normalised."""

    num_classes = 10

    def __init__(self, split: str, img_size: int, mean, std):
        if split not in ('train', 'val'):
            raise ToolError(f"the digits dataset has splits 'train' and 'val', not {split!r}")
        images, labels = _load_digits_split(split)
        # pixel values are counts 0..16 of an original 32x32 bitmap
        small = torch.from_numpy(images).float().view(-1, 1, 8, 8) / 16.0
        self.images = F.interpolate(small, size=(img_size, img_size), mode='bilinear', align_corners=False)
        self.labels = torch.from_numpy(labels).long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = (self.images[index].expand(3, -1, -1) - self.mean) / self.std
        return image, self.labels[index]


def _split_dir(root: str, split: str) -> Path:
    path = Path(root) / split
    if not path.is_dir():
        raise ToolError(
            f'--dataset {root}: no folder {path}. An ImageFolder root holds one folder per split '
            f'(ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg); pass --dataset digits for the '
            f'embedded dataset, or name the split folders with --train-split / --val-split / --split')
    return path


def num_classes_of(dataset: str, split: str) -> int:
    if dataset == DIGITS:
        return DigitsDataset.num_classes
    classes, _ = find_classes(_split_dir(dataset, split))
    return len(classes)


def data_config(model: torch.nn.Module, dataset: str, img_size: Optional[int]) -> dict:
    """timm's data config of ``model``; the input size is ``img_size``, else ``DIGITS_IMG_SIZE``
    for digits, else the model's default."""
    if img_size is None and dataset == DIGITS:
        img_size = DIGITS_IMG_SIZE
    overrides = {'input_size': (3, img_size, img_size)} if img_size else {}
    return resolve_data_config(overrides, model=model)


def build_dataset(dataset: str, split: str, config: dict, training: bool) -> Dataset:
    """One split of ``--dataset`` (``digits`` or an ImageFolder root), transformed for ``config``."""
    if dataset == DIGITS:
        return DigitsDataset(split, config['input_size'][-1], config['mean'], config['std'])
    transform = create_transform(**config, is_training=training)
    return ImageFolder(str(_split_dir(dataset, split)), transform=transform)


def check_same_classes(dataset: str, train_split: str, val_split: str) -> None:
    if dataset == DIGITS:
        return
    train_classes, _ = find_classes(_split_dir(dataset, train_split))
    val_classes, _ = find_classes(_split_dir(dataset, val_split))
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))
        raise ToolError(f'{dataset}: the {train_split} and {val_split} folders hold different classes '
                        f'(in one only: {only[:10]}); both splits need the same class folders')


def train_loader(dataset: Dataset, batch_size: int, workers: int, dist_info: DistInfo, seed: int) -> DataLoader:
    """Shuffled batches of this rank's shard; call ``loader.sampler.set_epoch(epoch)`` each epoch.

    The permutation depends on (seed, epoch) only, so a resumed run sees the same batches.
    """
    if len(dataset) < batch_size * dist_info.world_size:
        raise ToolError(f'the training split has {len(dataset)} images, fewer than one batch '
                        f'({batch_size} x {dist_info.world_size} processes); lower --batch-size')
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=dist_info.device.type == 'cuda', drop_last=True)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, dist_info: DistInfo) -> DataLoader:
    # every image exactly once over all ranks (DistributedSampler would pad with repeats)
    indices = range(dist_info.rank, len(dataset), dist_info.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                      pin_memory=dist_info.device.type == 'cuda')


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, dist_info: DistInfo,
             autocast_dtype: Optional[torch.dtype], desc: str = 'eval', leave: bool = True) -> dict:
    """Top-1 and top-5 accuracy (percent) over all ranks' images; top-5 is top-k with k = the
    number of classes when there are fewer than five."""
    model.eval()
    device = dist_info.device
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images
    for images, labels in tqdm(loader, desc=desc, disable=not dist_info.is_main, leave=leave, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)])
    if dist_info.enabled:
        dist.all_reduce(counts)
    top1, top5, num_images = counts.tolist()
    if num_images == 0:
        raise ToolError('the evaluation split holds no images')
    return {'top1': 100.0 * top1 / num_images, 'top5': 100.0 * top5 / num_images, 'num_images': int(num_images)}


# ----------------------------------------------------------------------------------------------
# checkpoints


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
    reason = str(err).strip().splitlines()[0].split('. ')[0]  # torch's advice after the first sentence does not apply
    return ToolError(f'cannot read checkpoint {path} ({type(err).__name__}: {reason}). The file is truncated, '
                     f'corrupt or not a safetensors/PyTorch checkpoint (PyTorch files are read with '
                     f'weights_only=True: tensors and plain containers only); re-download it or re-run the training')


def read_safetensors(path: Path, step: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a safetensors file; with ``step``, the file must have been saved at that step."""
    if not path.is_file():
        raise ToolError(f'checkpoint file {path} does not exist')
    try:
        with safetensors.safe_open(str(path), framework='pt') as f:
            saved_step = (f.metadata() or {}).get('step')
        tensors = safetensors.torch.load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise _read_error(path, err) from err
    if step is not None and saved_step != str(step):
        raise ToolError(f'{path} was saved at step {saved_step}, but {path.parent / STATE_FILE} at step {step}: '
                        f'the run was killed while writing its checkpoint and this directory cannot be resumed')
    return tensors


def _unwrap_state_dict(checkpoint, path: Path, use_ema: bool) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise ToolError(f'{path} holds a {type(checkpoint).__name__}, not a state dict')
    keys = ('state_dict_ema', 'model_ema', 'state_dict', 'model') if use_ema else ('state_dict', 'model')
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ToolError(f'{path} is not a state dict of tensors (entries {not_tensors[:10]} are not tensors); '
                        f"a training checkpoint keeps its weights under 'state_dict', 'state_dict_ema' or 'model'")
    return clean_state_dict(checkpoint)


def read_state_dict(path, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The weights in ``path``: our ``.safetensors`` or an official ``.pth``/``.pt``/``.bin``.

    A torch file is loaded with ``weights_only=True`` and unwrapped from ``state_dict`` /
    ``model`` (``state_dict_ema`` / ``model_ema`` first with ``use_ema``); DDP and
    torch.compile prefixes are removed.
    """
    path = Path(path)
    if path.is_dir():
        raise ToolError(f'{path} is a directory; pass the weights file in it, e.g. {path / MODEL_FILE} or {path / EMA_FILE}')
    if path.suffix == '.safetensors':
        return _unwrap_state_dict(read_safetensors(path), path, use_ema)
    if not path.is_file():
        raise ToolError(f'checkpoint file {path} does not exist')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch.load raises pickle, zip and runtime errors for damaged files
        raise _read_error(path, err) from err
    return _unwrap_state_dict(checkpoint, path, use_ema)


def _mismatches(state_dict: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> list:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]

    def listed(title, items):
        more = f', ... ({len(items) - 10} more)' if len(items) > 10 else ''
        return [f'{title} ({len(items)}): {", ".join(items[:10])}{more}'] if items else []

    return listed('missing keys', missing) + listed('unexpected keys', unexpected) + listed('shape mismatches', shapes)


def load_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Loads ``state_dict`` strictly; keys of another layout go through the model family's
    ``checkpoint_filter_fn`` first (official checkpoints). Any mismatch raises a :class:`ToolError`."""
    expected = model.state_dict()
    if _mismatches(state_dict, expected):
        filter_fn = getattr(sys.modules[type(model).__module__], 'checkpoint_filter_fn', None)
        if filter_fn is not None:
            try:
                state_dict = filter_fn(state_dict, model)
            except Exception as err:  # a converter meeting another family's keys fails in its own way
                raise ToolError(f'{source}: {type(model).__module__}.checkpoint_filter_fn could not convert it '
                                f'({type(err).__name__}: {err}); is it a checkpoint of this model family?') from err
    problems = _mismatches(state_dict, expected)
    if problems:
        details = '\n  '.join(problems)
        raise ToolError(f'{source} does not fit {type(model).__name__} ({type(model).__module__}):\n  {details}\n'
                        f'Check --model; a classifier trained on another dataset has another number of classes.')
    model.load_state_dict(state_dict, strict=True)


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
