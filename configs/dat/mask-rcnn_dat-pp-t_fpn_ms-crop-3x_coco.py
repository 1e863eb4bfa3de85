# Mask R-CNN, DAT-T++ backbone, FPN, 3x schedule (36 epochs) with multi-scale crop training, COCO.
# As the official DAT-Detection config configs/dat/mrcn_tiny_3x_4n_dp03_lr4.py (box / mask mAP 50.5 / 45.1):
# the 1x recipe with drop path 0.3 and 36 epochs.
_base_ = ['./mask-rcnn_dat-pp-t_fpn_ms-crop-1x_coco.py']

model = dict(backbone=dict(drop_path_rate=0.3))

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
