# RetinaNet, LITv2-B backbone with HiLo window 4 in stage 3 (the official *_ws_4 config).
_base_ = ['./retinanet_litv2-b-ws2_fpn_1x_coco.py']

model = dict(backbone=dict(window_size=4))
