"""attnzoo.heads: where attnzoo backbones meet OpenMMLab task heads (imported by mmdet / mmseg configs)."""
