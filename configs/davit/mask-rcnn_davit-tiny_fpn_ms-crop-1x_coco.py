# Mask R-CNN, DaViT-T backbone (timm's davit_tiny), FPN, 1x schedule (12 epochs) with DETR-style
# multi-scale crop augmentation, COCO instance segmentation. The official DaViT setting
# (dingmyu/davit, mmdet/configs/davit_maskrcnn_1x_coco.py): a LayerNorm on every backbone output,
# drop path 0.1, AdamW lr 1e-4, weight decay 0.05, steps at epochs 8 and 11, batch 16 (8 GPUs x 2).
# mmdet's own Swin-T ms-crop config supplies the model, the same data pipeline and the optimiser.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='davit_tiny',
        out_indices=(0, 1, 2, 3),
        # timm's ImageNet-1K weights (the official release); offline: pretrained=False,
        # checkpoint='/path/to/davit_tiny.pth'
        pretrained=True,
        out_norm=True,
        drop_path_rate=0.1),
    neck=dict(in_channels=[96, 192, 384, 768]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
