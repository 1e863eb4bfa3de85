# UPerNet, TransNeXt-Base backbone, 160k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# As the Tiny config but for the backbone
# (official: segmentation/upernet/configs/upernet_transnext_base_512x512_160k_ade20k_ss.py).
_base_ = ['./upernet_transnext-t_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(model_name='transnext_base', drop_path_rate=0.7),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
