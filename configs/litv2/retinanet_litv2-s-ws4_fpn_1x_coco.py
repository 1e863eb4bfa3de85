# RetinaNet, LITv2-S backbone with HiLo window 4 in stage 3 (the official *_ws_4 config): fewer
# Lo-Fi keys and larger Hi-Fi windows, faster at detection resolution. Otherwise as window 2.
_base_ = ['./retinanet_litv2-s-ws2_fpn_1x_coco.py']

model = dict(backbone=dict(window_size=4))
