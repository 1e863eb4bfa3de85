# Mask R-CNN, TransNeXt-Base backbone, FPN, 1x schedule (12 epochs), COCO instance segmentation.
# As the Tiny config but for the backbone (official: detection/maskrcnn/configs/mask_rcnn_transnext_base_fpn_1x_coco.py).
_base_ = ['./mask-rcnn_transnext-t_fpn_1x_coco.py']

model = dict(
    backbone=dict(model_name='transnext_base', drop_path_rate=0.7),
    neck=dict(in_channels=[96, 192, 384, 768]))
