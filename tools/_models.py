"""Creating timm / attnzoo models by name for the tools, with errors that suggest close names."""
from pathlib import Path
from typing import Optional

import timm
import torch

from attnzoo.backbones import close_model_names  # importing it registers every attnzoo family with timm
from _checkpoints import read_checkpoint
from _runtime import ToolError


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
        read_checkpoint(pretrained_file)  # verified (CRCs, sizes, finite values) before timm's loader reads it
        kwargs['pretrained_cfg_overlay'] = dict(file=str(pretrained_file))
        pretrained = True
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
