# Mask R-CNN, CrossFormer-S backbone, FPN, 1x schedule (12 epochs), COCO instance segmentation.
# As the official config (cheerss/CrossFormer, detection/configs/crossformer/mask_rcnn_crossformer_s_fpn_1x_coco.py):
# the dense-task group size 7 and LDA intervals 8/4/2/1, drop path 0.2, AdamW lr 1e-4 and weight decay
# 1e-4, 500 linear warm-up iterations, steps at epochs 8 and 11, 2 images per GPU on 8 GPUs.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='crossformer_small',
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release. They sit behind a Google Drive / BaiduCloud share
        # page that cannot be downloaded automatically (pretrained=True says where): download the file
        # and replace pretrained=True with checkpoint='/path/to/crossformer-s.pth'
        pretrained=True,
        # the official dense-task backbone settings, for both generations
        group_size=(7, 7, 7, 7),
        interval=(8, 4, 2, 1),
        drop_path_rate=0.2),
    neck=dict(in_channels=[96, 192, 384, 768]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, weight_decay=0.0001))
