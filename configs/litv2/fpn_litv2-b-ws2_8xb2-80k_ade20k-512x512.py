# Semantic FPN, LITv2-B backbone (HiLo window 2): drop path 0.3, as the official config; wider maps
# for the neck.
_base_ = ['./fpn_litv2-s-ws2_8xb2-80k_ade20k-512x512.py']

model = dict(
    backbone=dict(model_name='litv2_base', drop_path_rate=0.3),
    neck=dict(in_channels=[128, 256, 512, 1024]))
