"""Creating timm / attnzoo models by name for the tools, with errors that suggest close names."""
from pathlib import Path
from typing import Optional

import timm
import torch

from attnzoo.backbones import close_model_names  # importing it registers every attnzoo family with timm
from attnzoo.backbones._checkpoint import pretrained_weights_source
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
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except OSError as err:  # URLError, HTTPError, the Hub's offline errors: a download that failed
        if not pretrained or pretrained_file is not None:
            raise
        raise ToolError(f'--pretrained: cannot download the weights of {name} from '
                        f'{pretrained_weights_source(name, kwargs)} ({type(err).__name__}: {err}). Download the file '
                        f'where the network reaches it and pass it with --pretrained-file /path/to/file') from err
    except (TypeError, ValueError, AssertionError) as err:
        if not model_kwargs:
            raise
        raise ToolError(f'--model-kwargs {_as_options(model_kwargs)}: {name} cannot be built with them '
                        f'({type(err).__name__}: {err}); check the names and the values\' types, e.g. '
                        f'drop_rate=0.1') from err


def _as_options(kwargs: dict) -> str:
    return ' '.join(f'{k}={v!r}' for k, v in kwargs.items())


def check_input_size(model: torch.nn.Module, input_size, img_size: Optional[int],
                     autocast_dtype: Optional[torch.dtype]) -> None:
    """Runs one blank image of ``input_size`` (C, H, W) through ``model`` (under autocast to ``autocast_dtype``,
    as the tool will) and raises a :class:`ToolError` if it cannot take that size; ``img_size`` is the
    ``--img-size`` asked for (None: the model's own)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            model(torch.zeros(1, *input_size, device=device))
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:
        default = model.pretrained_cfg.get('input_size', (None, '?'))[1]
        option = f'--img-size {img_size}' if img_size is not None else f'input size {input_size[1]}'
        reason = (str(err).strip().splitlines() or [''])[0]
        raise ToolError(f'{option}: {model.pretrained_cfg["architecture"]} cannot take {input_size[1]} x '
                        f'{input_size[2]} images ({type(err).__name__}: {reason}); use its own size, {default}, or '
                        f'another size it takes') from err
    finally:
        model.train(training)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
