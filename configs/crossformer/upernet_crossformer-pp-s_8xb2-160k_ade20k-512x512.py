# UPerNet, CrossFormer++-S backbone, 160k iterations, ADE20K 512x512: the CrossFormer-S recipe with the
# ++-S backbone (the official CrossFormer_S2: drop path 0.2, and the same dense-task group size 7 and
# LDA intervals 8/4/2/1, not the classification model's 4/4/14/7 and 4/2/1/1).
_base_ = ['./upernet_crossformer-s_8xb2-160k_ade20k-512x512.py']

model = dict(
    backbone=dict(model_name='crossformer_pp_small'),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
