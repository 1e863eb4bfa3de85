# Semantic FPN, BiFormer-B backbone, 80k iterations at batch 32 (8 GPUs x 4), ADE20K 512x512.
# As the BiFormer-S config, with the official BiFormer-B options
# (rayleizhu/BiFormer, semantic_segmentation/configs/ade20k/sfpn.biformer_base.py).
_base_ = ['./fpn_biformer-s_8xb4-80k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        model_name='biformer_base',
        # the official file: biformer_base_in1k.pth in torch's hub cache
        drop_path_rate=0.3),
    neck=dict(in_channels=[96, 192, 384, 768]))
