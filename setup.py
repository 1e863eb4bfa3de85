"""attnzoo: attention vision backbones for timm, fused Triton attention kernels, OpenMMLab adapters.

The three top-level folders install under one namespace (``attnzoo.backbones``,
``attnzoo.heads``, ``attnzoo.kernels``) so nothing generic such as ``kernels`` lands in
site-packages.
"""
from setuptools import setup

PACKAGE_DIRS = {
    'attnzoo.backbones': 'backbones',
    'attnzoo.heads': 'heads',
    'attnzoo.kernels': 'kernels',
}

MM_REQUIRES = [
    'mmengine==0.10.7',
    'mmcv==2.1.0',
    'mmdet==3.3.0',
    'mmsegmentation==1.2.2',
    'ftfy',
    'regex',
    'setuptools>=77,<81',  # mmengine imports pkg_resources
]

setup(
    name='attnzoo',
    version='0.1.0',
    description='Attention vision backbones for timm with fused Triton attention kernels',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    install_requires=[
        # torch.serialization.safe_globals (the checkpoint reader) is new in 2.5; torch.library.custom_op,
        # register_fake and register_autograd (the ops) in 2.4
        'torch>=2.5',
        'torchvision',
        # timm.models._input.get_model_traits is new in 1.0.31 (tests/test_version_floors.py)
        'timm>=1.0.31',
        'safetensors',
        'tqdm',
        'numpy',
        'scikit-learn',  # the embedded default dataset (handwritten digits) of tools/train.py
    ],
    extras_require={
        'mm': MM_REQUIRES,
        'natten': ['natten>=0.21'],
        'dev': ['pytest>=8', 'pytest-timeout', 'pytest-xdist>=3', 'matplotlib'],
        # tools/export.py and tests/test_export.py: torch.onnx's dynamo exporter and its check in onnxruntime
        'export': ['onnx>=1.18', 'onnxscript>=0.5', 'onnxruntime>=1.22'],
    },
)
