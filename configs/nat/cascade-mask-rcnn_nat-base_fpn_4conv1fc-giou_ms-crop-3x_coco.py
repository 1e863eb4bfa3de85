# Cascade Mask R-CNN, NAT-Base backbone: the NAT-Mini config with the official
# NAT-Base settings (SHI-Labs/Neighborhood-Attention-Transformer,
# detection/configs/nat/cascade_mask_rcnn_nat_base_3x_coco.py).
_base_ = './cascade-mask-rcnn_nat-mini_fpn_4conv1fc-giou_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='nat_base',
        drop_path_rate=0.5),
    neck=dict(in_channels=[128, 256, 512, 1024]))
