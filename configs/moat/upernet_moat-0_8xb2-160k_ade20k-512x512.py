# UPerNet, MOAT-0 backbone, 160k ADE20K 512x512: the tiny-MOAT-2 config with the MOAT-0 backbone.
_base_ = ['./upernet_tiny-moat-2_8xb2-160k_ade20k-512x512.py']

channels = [96, 192, 384, 768]
model = dict(
    # weights: python tools/convert.py <unpacked checkpoint> --model moat_0 -o moat_0.safetensors
    backbone=dict(model_name='moat_0', drop_path_rate=0.2),
    decode_head=dict(in_channels=channels),
    auxiliary_head=dict(in_channels=channels[2]))
