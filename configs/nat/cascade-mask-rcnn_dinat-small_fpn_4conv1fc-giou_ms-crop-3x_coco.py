# Cascade Mask R-CNN, DiNAT-Small backbone: the NAT-Mini config with the official
# DiNAT-Small settings (SHI-Labs/Neighborhood-Attention-Transformer,
# detection/configs/dinat/cascade_mask_rcnn_dinat_small_3x_coco.py).
# DiNAT dilations for dense tasks: larger than the classification ones, sized for the
# stage maps of 800 x 1333 detection inputs.
_base_ = './cascade-mask-rcnn_nat-mini_fpn_4conv1fc-giou_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='dinat_small',
        drop_path_rate=0.5,
        dilations=((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1))),
    neck=dict(in_channels=[96, 192, 384, 768]))
