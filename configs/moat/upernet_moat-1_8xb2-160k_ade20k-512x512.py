# UPerNet, MOAT-1 backbone, 160k ADE20K 512x512: the tiny-MOAT-2 config with the MOAT-1 backbone.
_base_ = ['./upernet_tiny-moat-2_8xb2-160k_ade20k-512x512.py']

channels = [96, 192, 384, 768]
model = dict(
    # weights: python tools/convert.py <unpacked checkpoint> --model moat_1 -o moat_1.safetensors
    backbone=dict(model_name='moat_1', drop_path_rate=0.3),
    decode_head=dict(in_channels=channels),
    auxiliary_head=dict(in_channels=channels[2]))
