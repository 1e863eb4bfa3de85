# Semantic FPN, CrossFormer-S backbone, 80k iterations at batch 32 (8 GPUs x 4), ADE20K 512x512.
# As the official config (cheerss/CrossFormer, segmentation/configs/crossformer/fpn_crossformer_s_ade20k_40k.py,
# which runs 80k iterations despite its name): the dense-task group size 7 and LDA intervals 8/4/2/1,
# drop path 0.2, AdamW lr 1e-4 and weight decay 1e-4, poly decay to 0 with power 0.9, 4 images per GPU.
_base_ = [
    'mmseg::_base_/models/fpn_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py',
]
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    # mmseg would hand a string here to the backbone; AttnzooBackbone takes its weights below
    pretrained=None,
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
    neck=dict(in_channels=[96, 192, 384, 768]),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001))
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=80000, by_epoch=False),
]
train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
