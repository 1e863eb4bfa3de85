# UPerNet, BiFormer-B backbone, 160k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# As the BiFormer-S config, with the official BiFormer-B options
# (rayleizhu/BiFormer, semantic_segmentation/configs/ade20k/upernet.biformer_base.py).
_base_ = ['./upernet_biformer-s_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(
        model_name='biformer_base',
        # the official file: biformer_base_in1k.pth in torch's hub cache
        drop_path_rate=0.4),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
