"""attnzoo.backbones: importing this registers every attnzoo family with timm."""
from . import nat
from . import cswin
