# Mask R-CNN, tiny-MOAT-2 backbone, FPN, 1x schedule (12 epochs), COCO instance segmentation.
# The MOAT paper reports Cascade Mask R-CNN (and DeepLab / kMaX-DeepLab in deeplab2); this is the
# common Mask R-CNN 1x baseline on the same backbone. Optimiser and schedule: mmdet's 1x recipe for
# Swin-T Mask R-CNN (AdamW).
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
        model_name='tiny_moat_2',
        # feature 0 is the stride-2 stem; 1-4 are the stride-4..32 stages
        out_indices=(1, 2, 3, 4),
        # the official ImageNet-1K weights are TensorFlow checkpoints: convert them first
        # (python tools/convert.py <unpacked checkpoint> --model tiny_moat_2 -o tiny_moat_2.safetensors, see
        # model_cards/moat.md) and set checkpoint='tiny_moat_2.safetensors'
        pretrained=True,
        # the official dense-task backbone: window attention (14x14 at stride 16, 7x7 at stride 32) with
        # global attention in the last block of each MOAT stage, 3x3 shortcut pooling (deeplab2's
        # get_model default for downstream tasks)
        window_size=(None, None, 14, 7),
        global_attention_at_end_of_moat_stage=True,
        shortcut_pool_size=3,
        drop_path_rate=0.1,
        # BatchNorm statistics stay at their ImageNet values (2 images per GPU); the official training
        # uses SyncBN, which mmengine's sync_bn conversion would apply without timm's fused activation
        norm_eval=True),
    neck=dict(in_channels=[56, 112, 224, 448]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    # no weight decay on norms and on the relative position tables (timm's no_weight_decay)
    paramwise_cfg=dict(custom_keys={
        'norm': dict(decay_mult=0.),
        'relative_position_bias_table': dict(decay_mult=0.),
    }),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
