# Mask R-CNN, TransNeXt-Small backbone, FPN, 1x schedule (12 epochs), COCO instance segmentation.
# As the Tiny config but for the backbone (official: detection/maskrcnn/configs/mask_rcnn_transnext_small_fpn_1x_coco.py).
_base_ = ['./mask-rcnn_transnext-t_fpn_1x_coco.py']

model = dict(
    backbone=dict(model_name='transnext_small', drop_path_rate=0.6),
    neck=dict(in_channels=[72, 144, 288, 576]))
