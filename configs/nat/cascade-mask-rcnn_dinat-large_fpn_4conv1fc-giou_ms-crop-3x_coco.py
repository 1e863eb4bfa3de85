# Cascade Mask R-CNN, DiNAT-Large backbone: the NAT-Mini config with the official
# DiNAT-Large settings (SHI-Labs/Neighborhood-Attention-Transformer,
# detection/configs/dinat/cascade_mask_rcnn_dinat_large_3x_coco.py).
# DiNAT dilations for dense tasks: larger than the classification ones, sized for the
# stage maps of 800 x 1333 detection inputs.
# The official run starts from the ImageNet-22K checkpoint (dinat_large_in22k_224.pth); pretrained=True
# loads timm's dinat_large default, the 22K model fine-tuned on ImageNet-1K: pass the 22K file as
# checkpoint=... (with pretrained=False) for the paper's setting.
_base_ = './cascade-mask-rcnn_nat-mini_fpn_4conv1fc-giou_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        model_name='dinat_large',
        drop_path_rate=0.6,
        dilations=((1, 28, 1), (1, 7, 1, 14), (1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7, 1, 3, 1, 5, 1, 7), (1, 3, 1, 3, 1))),
    neck=dict(in_channels=[192, 384, 768, 1536]))
optim_wrapper = dict(optimizer=dict(lr=0.000075))
