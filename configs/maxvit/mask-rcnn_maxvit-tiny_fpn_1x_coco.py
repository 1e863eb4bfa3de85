# Mask R-CNN, MaxViT-T backbone (timm's maxvit_tiny_tf_224), FPN, 1x schedule (12 epochs), COCO instance
# segmentation. The MaxViT paper reports COCO with Cascade Mask R-CNN only and its TensorFlow code has
# no detection configs, so the optimiser and schedule are mmdet's Swin-T Mask R-CNN 1x recipe (AdamW
# lr 1e-4, weight decay 0.05, steps at epochs 8 and 11, batch 16); drop path 0.2, MaxViT-T's ImageNet rate.
# timm's MaxViT partitions every stage into fixed 7 x 7 windows / grids: AttnzooBackbone pads each
# batch to a multiple of 224 px (32 x 7) and crops the maps back (an 800 x 1216 batch runs at 896 x 1344).
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
        model_name='maxvit_tiny_tf_224',
        # level 0 is MaxViT's stride-2 stem; 1..4 are the stride 4..32 stages
        out_indices=(1, 2, 3, 4),
        # timm's ImageNet-1K weights (converted from the official TensorFlow release); offline:
        # pretrained=False, checkpoint='/path/to/maxvit_tiny_tf_224.pth'
        pretrained=True,
        out_norm=True,
        drop_path_rate=0.2),
    neck=dict(in_channels=[64, 128, 256, 512]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    # no weight decay on norms and relative position biases
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.), 'rel_pos': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
