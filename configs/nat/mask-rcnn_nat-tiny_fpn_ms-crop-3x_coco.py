# Mask R-CNN, NAT-Tiny backbone: the NAT-Mini config with the official
# NAT-Tiny settings (SHI-Labs/Neighborhood-Attention-Transformer,
# detection/configs/nat/mask_rcnn_nat_tiny_3x_coco.py).
_base_ = './mask-rcnn_nat-mini_fpn_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='nat_tiny',
        drop_path_rate=0.2),
    neck=dict(in_channels=[64, 128, 256, 512]))
