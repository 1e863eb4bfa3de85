# Mask R-CNN, HaloNet-26T backbone (timm's halonet26t), FPN, 1x schedule (12 epochs), COCO instance
# segmentation. HaloNet has no official code or detection config; this is mmdet's Mask R-CNN 1x with the
# ResNet handling of BatchNorm backbones (stem and first stage frozen, BatchNorm statistics frozen:
# 2 images per GPU are too few to estimate them) and AdamW (lr 1e-4, weight decay 0.05), as mmdet's
# ConvNeXt configs train a convolutional backbone.
# timm's HaloNet attends in fixed 8 x 8 blocks: AttnzooBackbone pads each batch to a multiple of 256 px
# (32 x 8) and crops the maps back.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='halonet26t',
        # level 0 is the stride-2 stem; 1..4 the stride 4..32 stages (4: after the final 1x1 conv)
        out_indices=(1, 2, 3, 4),
        # timm's ImageNet-1K weights; offline: pretrained=False, checkpoint='/path/to/halonet26t.pth'
        pretrained=True,
        frozen_stages=2,  # the stem and the stride-4 stage, as mmdet's ResNet frozen_stages=1
        norm_eval=True),
    neck=dict(in_channels=[256, 512, 1024, 2048]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    # no weight decay on norms and the relative position embeddings
    paramwise_cfg=dict(norm_decay_mult=0., custom_keys={'pos_embed': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
