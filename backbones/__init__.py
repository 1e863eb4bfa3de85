"""attnzoo.backbones: importing this registers every attnzoo family with timm."""
from . import cswin, nat

__all__ = ['cswin', 'nat']
