# Mask R-CNN, MOAT-1 backbone, FPN, 1x COCO: the tiny-MOAT-2 config with the MOAT-1 backbone.
_base_ = ['./mask-rcnn_tiny-moat-2_fpn_1x_coco.py']

model = dict(
    # weights: python tools/convert.py <unpacked checkpoint> --model moat_1 -o moat_1.safetensors
    backbone=dict(model_name='moat_1', drop_path_rate=0.3),
    neck=dict(in_channels=[96, 192, 384, 768]))
