# Mask R-CNN, CSWin-T backbone, FPN, 1x schedule (12 epochs), COCO instance segmentation.
# Optimiser and schedule: AdamW as the CSWin paper, with mmdet's 1x recipe for Swin-T Mask R-CNN.
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
        model_name='cswin_tiny_224',
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn;
        # offline: pretrained=False, checkpoint='/path/to/cswin_tiny_224.pth'
        pretrained=True,
        # the official CSWin dense-task backbone: a LayerNorm on every output, stripe widths
        # 1/2/7/7, drop path 0.3 (its CSWin-T segmentation config; it publishes no detection configs)
        out_norm=True,
        split_size=(1, 2, 7, 7),
        drop_path_rate=0.3),
    neck=dict(in_channels=[64, 128, 256, 512]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    # no weight decay on norms (the LayerNorms inside CSWin and the output norms)
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
