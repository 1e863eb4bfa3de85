# UPerNet, tiny-MOAT-3 backbone, 160k ADE20K 512x512: the tiny-MOAT-2 config with the tiny-MOAT-3 backbone.
_base_ = ['./upernet_tiny-moat-2_8xb2-160k_ade20k-512x512.py']

channels = [80, 160, 320, 640]
model = dict(
    # weights: python tools/convert.py <unpacked checkpoint> --model tiny_moat_3 -o tiny_moat_3.safetensors
    backbone=dict(model_name='tiny_moat_3', drop_path_rate=0.2),
    decode_head=dict(in_channels=channels),
    auxiliary_head=dict(in_channels=channels[2]))
