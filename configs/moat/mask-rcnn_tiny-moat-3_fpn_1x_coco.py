# Mask R-CNN, tiny-MOAT-3 backbone, FPN, 1x COCO: the tiny-MOAT-2 config with the tiny-MOAT-3 backbone.
_base_ = ['./mask-rcnn_tiny-moat-2_fpn_1x_coco.py']

model = dict(
    # weights: python tools/convert.py <unpacked checkpoint> --model tiny_moat_3 -o tiny_moat_3.safetensors
    backbone=dict(model_name='tiny_moat_3', drop_path_rate=0.2),
    neck=dict(in_channels=[80, 160, 320, 640]))
