# Semantic FPN, CrossFormer-B backbone, 80k iterations, ADE20K 512x512: the CrossFormer-S recipe with
# the B backbone and drop path 0.3 (the official CrossFormer_B; same widths as S).
_base_ = ['./fpn_crossformer-s_8xb4-80k_ade20k-512x512.py']

model = dict(backbone=dict(model_name='crossformer_base', drop_path_rate=0.3))
