"""What every command-line tool of tools/ shares at run time: the error a user can fix and how it is
printed, the device, the process group under torchrun, seeds and the autocast dtype."""
import os
import random
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


class ToolError(ValueError):
    """A bad input the user can fix; the command-line tools print it without a traceback."""


def check_at_least(args, minimums: dict) -> None:
    """Raises a :class:`ToolError` for the first option of ``minimums`` (``{dest: smallest value}``) that is set
    below its smallest value (or to NaN)."""
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and not value >= minimum:
            raise ToolError(f'--{name.replace("_", "-")} {value}: must be at least {minimum}')


def run_cli(main):
    """Runs ``main()`` and turns a :class:`ToolError` into a one-line message and exit status 1."""
    try:
        main()
    except ToolError as err:
        sys.exit(f'error: {err}')


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
