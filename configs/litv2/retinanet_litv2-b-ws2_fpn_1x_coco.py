# RetinaNet, LITv2-B backbone (HiLo window 2): drop path 0.3 and gradient checkpointing, as the
# official config; wider maps for the neck.
_base_ = ['./retinanet_litv2-s-ws2_fpn_1x_coco.py']

model = dict(
    backbone=dict(model_name='litv2_base', drop_path_rate=0.3, with_cp=True),
    neck=dict(in_channels=[256, 512, 1024]))
