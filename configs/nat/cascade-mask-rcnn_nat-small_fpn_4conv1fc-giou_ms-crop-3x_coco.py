# Cascade Mask R-CNN, NAT-Small backbone: the NAT-Mini config with the official
# NAT-Small settings (SHI-Labs/Neighborhood-Attention-Transformer,
# detection/configs/nat/cascade_mask_rcnn_nat_small_3x_coco.py).
_base_ = './cascade-mask-rcnn_nat-mini_fpn_4conv1fc-giou_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='nat_small',
        drop_path_rate=0.3),
    neck=dict(in_channels=[96, 192, 384, 768]))
