# Mask R-CNN, DiNAT-Mini backbone: the NAT-Mini config with the official
# DiNAT-Mini settings (SHI-Labs/Neighborhood-Attention-Transformer,
# detection/configs/dinat/mask_rcnn_dinat_mini_3x_coco.py).
# DiNAT dilations for dense tasks: larger than the classification ones, sized for the
# stage maps of 800 x 1333 detection inputs.
_base_ = './mask-rcnn_nat-mini_fpn_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='dinat_mini',
        drop_path_rate=0.2,
        dilations=((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1))),
    neck=dict(in_channels=[64, 128, 256, 512]))
