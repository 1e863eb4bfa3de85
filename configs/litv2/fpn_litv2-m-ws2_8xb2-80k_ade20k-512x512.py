# Semantic FPN, LITv2-M backbone (HiLo window 2); the official settings of LITv2-S otherwise.
_base_ = ['./fpn_litv2-s-ws2_8xb2-80k_ade20k-512x512.py']

model = dict(backbone=dict(model_name='litv2_medium'))
