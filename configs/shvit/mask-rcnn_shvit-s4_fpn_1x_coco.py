# Mask R-CNN, SHViT-S4 backbone (timm's shvit_s4), FPN, 1x schedule (12 epochs), COCO instance segmentation.
# S4 because it is the one SHViT variant with published COCO results. The official setting
# (ysj9909/SHViT, downstream/configs/mask_rcnn_shvit_s4_fpn_1x_coco.py): AdamW lr 1e-4, weight decay 0.05,
# 500 warm-up iterations, steps at epochs 8 and 11, batch 16 (its "no decay on attention_biases" names
# parameters SHViT does not have).
# SHViT's three feature levels have strides 16, 32 and 64 (its stem downsamples by 16). The official neck
# (EfficientViT's FPN) up-samples them with transposed convolutions to strides 4-64; here mmdet's FPN
# takes them as they are and adds two pooled levels (strides 16-256), and the anchors and RoI extractors
# follow those strides, with anchors of the R-50 sizes (32-512 px).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

strides = [16, 32, 64, 128, 256]
model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='shvit_s4',
        out_indices=(0, 1, 2),
        # timm's ImageNet-1K weights (the official release); offline: pretrained=False,
        # checkpoint='/path/to/shvit_s4.pth'
        pretrained=True),
    neck=dict(in_channels=[224, 336, 448], num_outs=5),
    rpn_head=dict(anchor_generator=dict(scales=[2], strides=strides)),
    roi_head=dict(
        bbox_roi_extractor=dict(featmap_strides=strides[:4]),
        mask_roi_extractor=dict(featmap_strides=strides[:4])))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
