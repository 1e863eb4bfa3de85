# Mask R-CNN, DAT-T++ backbone, FPN, 1x schedule (12 epochs) with multi-scale crop training, COCO.
# As the official DAT-Detection config configs/dat/mrcn_tiny_1x_4n_dp00_lr4.py (box / mask mAP 48.7 / 43.7):
# the DETR-style multi-scale crop augmentation, AdamW, drop path 0.0, an FPN extra conv on its input, fp16.
# The official runs trained 64 images per step at lr 4e-4; here lr scales linearly to mmdet's 8 GPUs x 2.
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
        model_name='dat_pp_tiny',
        out_indices=(0, 1, 2, 3),
        # the official ImageNet-1K weights sit on share pages timm cannot download: download
        # dat_pp_tiny_in1k_224.pth (github.com/LeapLabTHU/DAT) and set
        # pretrained=False, checkpoint='/path/to/dat_pp_tiny_in1k_224.pth' (converted by attnzoo)
        pretrained=True,
        # the official dense backbone: a LayerNorm on every output, gradient checkpointing
        out_norm=True,
        with_cp=True,
        drop_path_rate=0.0),
    neck=dict(in_channels=[64, 128, 256, 512], add_extra_convs='on_input'))

# augmentation strategy originates from DETR / Sparse RCNN
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [
                dict(type='RandomChoiceResize', keep_ratio=True,
                     scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                             (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)]),
            ],
            [
                dict(type='RandomChoiceResize', keep_ratio=True, scales=[(400, 1333), (500, 1333), (600, 1333)]),
                dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600), allow_negative_crop=True),
                dict(type='RandomChoiceResize', keep_ratio=True,
                     scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333),
                             (672, 1333), (704, 1333), (736, 1333), (768, 1333), (800, 1333)]),
            ],
        ]),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    # no weight decay on the deformable bias tables and the norms, as the official configs
    paramwise_cfg=dict(custom_keys={'rpe_table': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
