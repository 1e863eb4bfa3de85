# Mask R-CNN, NAT-Small backbone: the NAT-Mini config with the official
# NAT-Small settings (SHI-Labs/Neighborhood-Attention-Transformer,
# detection/configs/nat/mask_rcnn_nat_small_3x_coco.py).
_base_ = './mask-rcnn_nat-mini_fpn_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='nat_small',
        drop_path_rate=0.35),
    neck=dict(in_channels=[96, 192, 384, 768]))
