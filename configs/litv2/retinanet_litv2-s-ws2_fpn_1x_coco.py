# RetinaNet, LITv2-S backbone (HiLo window 2), FPN, 1x schedule (12 epochs), COCO detection.
# As the official config (ziplab/LITv2, detection/configs/litv2/retinanet_litv2_s_fpn_1x_coco.py):
# AdamW lr 1e-4, weight decay 1e-4, mixed precision, batch 16 (8 GPUs x 2), mmdet's 1x schedule
# (linear warm-up over 500 iterations, steps at epochs 8 and 11). Its "norm: decay_mult 0" entry sits
# outside paramwise_cfg.custom_keys and so had no effect; it is left out here (the Mask R-CNN configs
# apply it).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
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
        # RetinaNet's FPN starts at stride 8; the official backbone computes the stride-4 map too but
        # the neck ignores it (start_level=1)
        out_indices=(1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn;
        # offline: pretrained=False, checkpoint='/path/to/litv2_s.pth'
        pretrained=True,
        # the official dense backbone: a LayerNorm on the stride 8 / 16 / 32 outputs
        out_norm=True,
        drop_path_rate=0.2),
    # the three maps become P3-P5; P6 and P7 are the base's extra convs on the stride-32 map
    neck=dict(in_channels=[192, 384, 768], start_level=0, num_outs=5))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, weight_decay=0.0001))
