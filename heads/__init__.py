"""attnzoo.heads: where attnzoo backbones meet OpenMMLab task heads.

Importing it registers ``AttnzooBackbone`` (one wrapper for every timm / attnzoo model) into the
model registries of mmdet and mmseg, each where that package is installed. Configs import it with
``custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)`` and then use
``backbone=dict(_delete_=True, type='AttnzooBackbone', model_name=..., out_indices=...)``.
Importing it also lets mmengine load its own checkpoints safely on torch >= 2.6 (``checkpoint.py``) and
registers ``LayerDecayOptimWrapperConstructor`` (layer-wise learning-rate decay, ``optim.py``).

This is the only attnzoo package that imports OpenMMLab.
"""
import importlib
import importlib.util

try:
    import mmengine  # noqa: F401
except ImportError as error:
    raise ImportError(
        "attnzoo.heads needs the OpenMMLab stack (mmengine, mmcv with its ops, mmdet and/or mmseg): "
        "pip install 'attnzoo[mm]' (see model_cards/openmmlab.md for building mmcv)") from error

from .backbone import AttnzooBackbone
from .checkpoint import allow_openmmlab_checkpoints
from .optim import LayerDecayOptimWrapperConstructor

__all__ = ['AttnzooBackbone', 'LayerDecayOptimWrapperConstructor']

# mmengine's own Runner checkpoints (resume, load_from) load with weights_only=True
allow_openmmlab_checkpoints()

# the task libraries whose model registry gets the wrapper; one that is installed but fails to
# import (e.g. mmdet's mmcv version check) raises here rather than leaving configs without the type
TASK_PACKAGES = ('mmdet', 'mmseg')

for _package in TASK_PACKAGES:
    if importlib.util.find_spec(_package) is not None:
        importlib.import_module(f'{_package}.registry').MODELS.register_module(module=AttnzooBackbone)
