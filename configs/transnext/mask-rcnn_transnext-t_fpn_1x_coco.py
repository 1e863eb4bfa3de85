# Mask R-CNN, TransNeXt-Tiny backbone, FPN, 1x schedule (12 epochs), COCO instance segmentation.
# Backbone options, optimiser and schedule as the official config
# (DaiShiResearch/TransNeXt, detection/maskrcnn/configs/mask_rcnn_transnext_tiny_fpn_1x_coco.py).
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
        model_name='transnext_tiny',
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn;
        # offline: pretrained=False, checkpoint='/path/to/transnext_tiny_224_1k.pth'
        pretrained=True,
        # the official dense backbone: the CPB bias built for 800 px (coordinates at the 224 px
        # pre-training scale) and bilinearly resized to each image; is_extrapolation=True recomputes it
        img_size=800,
        pretrain_size=224,
        is_extrapolation=False,
        drop_path_rate=0.4),
    neck=dict(in_channels=[72, 144, 288, 576]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    # the official no-decay keys: query embedding, local bias, CPB MLP, temperature, norms
    paramwise_cfg=dict(custom_keys={
        'query_embedding': dict(decay_mult=0.),
        'relative_pos_bias_local': dict(decay_mult=0.),
        'cpb': dict(decay_mult=0.),
        'temperature': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
