# Mask R-CNN, MOAT-0 backbone, FPN, 1x COCO: the tiny-MOAT-2 config with the MOAT-0 backbone.
_base_ = ['./mask-rcnn_tiny-moat-2_fpn_1x_coco.py']

model = dict(
    # weights: python tools/convert.py <unpacked checkpoint> --model moat_0 -o moat_0.safetensors
    backbone=dict(model_name='moat_0', drop_path_rate=0.2),
    neck=dict(in_channels=[96, 192, 384, 768]))
