# Mask R-CNN, NAT-Mini backbone, FPN, 3x schedule (36 epochs) with DETR-style multi-scale crop
# augmentation, COCO instance segmentation. The official NAT setting
# (SHI-Labs/Neighborhood-Attention-Transformer, detection/configs/nat/mask_rcnn_nat_mini_3x_coco.py):
# a LayerNorm on every backbone output, drop path 0.2, AdamW lr 1e-4, weight decay 0.05 except on the
# relative position biases and norms, 500 warm-up iterations, steps at epochs 27 and 33, mixed precision,
# batch 16 (8 GPUs x 2). mmdet's own Swin-T 3x config supplies the model, data pipeline and schedule.
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='nat_mini',
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn;
        # offline: pretrained=False, checkpoint='/path/to/nat_mini.pth'
        pretrained=True,
        out_norm=True,
        drop_path_rate=0.2),
    neck=dict(in_channels=[64, 128, 256, 512]))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
