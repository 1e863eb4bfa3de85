# RetinaNet, CrossFormer++-S backbone, FPN, 1x schedule, COCO: the CrossFormer-S recipe with the ++-S
# backbone (the official CrossFormer_S2: drop path 0.2, and the same dense-task group size 7 and LDA
# intervals 8/4/2/1, not the classification model's 4/4/14/7 and 4/2/1/1).
_base_ = ['./retinanet_crossformer-s_fpn_1x_coco.py']

model = dict(
    backbone=dict(model_name='crossformer_pp_small'),
    neck=dict(in_channels=[64, 128, 256, 512]))
