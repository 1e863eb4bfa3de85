"""Where and with what a result was measured: the device's name, the device kind every result file's name
starts with, and the versions of the libraries and of the code.

One machine kind has one name: every tool that writes a measurement names its device here
(model_cards/benchmarks/README.md, "Naming a new run").
"""
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def cpu_model():
    """The processor's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        with open('/proc/cpuinfo') as info:
            for line in info:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    """The GPU's name, or the CPU's model name and logical core count: 'CPU Intel(R) Xeon(R) Processor x2'."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU {cpu_model()} x{os.cpu_count()}'


def slug(text):
    return re.sub(r'[^A-Za-z0-9]+', '-', text).strip('-').lower()


def device_kind(device):
    """The first part of every result file's name: the device's name as a slug,
    'cpu-intel-r-xeon-r-processor-x2', 'nvidia-h100-80gb-hbm3'."""
    return slug(device_name(device))


def commit_of(folder):
    """The git commit of the checkout ``folder`` lies in, or None where it is no git work tree."""
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions():
    """The libraries and the code a result was measured with."""
    import timm
    import torchvision
    return dict(torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__,
                python=platform.python_version(), attnzoo_commit=commit_of(Path(__file__).resolve().parent))
