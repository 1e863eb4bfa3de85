# RetinaNet, LITv2-M backbone (HiLo window 2); the official settings of LITv2-S otherwise.
_base_ = ['./retinanet_litv2-s-ws2_fpn_1x_coco.py']

model = dict(backbone=dict(model_name='litv2_medium'))
