# Mask R-CNN, LITv2-S backbone (HiLo window 2), FPN, 1x schedule (12 epochs), COCO instance segmentation.
# As the official config (ziplab/LITv2, detection/configs/litv2/mask_rcnn_litv2_s_fpn_1x_coco.py):
# AdamW lr 2e-4, weight decay 1e-4 (none on norms), mixed precision, batch 16 (8 GPUs x 2), mmdet's 1x
# schedule (linear warm-up over 500 iterations, steps at epochs 8 and 11).
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
        model_name='litv2_small',
        # HiLo window of stage 3 (the official README's "window size"); stage 4 attends globally
        window_size=2,
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn;
        # offline: pretrained=False, checkpoint='/path/to/litv2_s.pth'
        pretrained=True,
        # a LayerNorm on every output; the official detection backbone has them on strides 8-32 only
        # (AttnzooBackbone normalises all returned levels or none)
        out_norm=True,
        drop_path_rate=0.2),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0002, weight_decay=0.0001))
