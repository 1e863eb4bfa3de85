# Mask R-CNN, CrossFormer-B backbone, FPN, 1x schedule, COCO: the CrossFormer-S recipe with the B
# backbone and drop path 0.3 (the official CrossFormer_B).
_base_ = ['./mask-rcnn_crossformer-s_fpn_1x_coco.py']

# (same widths as S: the neck is unchanged)
model = dict(backbone=dict(model_name='crossformer_base', drop_path_rate=0.3))
