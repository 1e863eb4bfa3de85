# UPerNet, CrossFormer-S backbone, 160k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# As the official config (cheerss/CrossFormer, segmentation/configs/crossformer/upernet_crossformer_s_ade20k.py):
# the dense-task group size 7 and LDA intervals 8/4/2/1, drop path 0.2, AdamW lr 6e-5, weight decay
# 0.01 (none on norms), 1500 linear warm-up iterations, then poly decay to 0 with power 1. The official
# S config gives the auxiliary head in_channels=256, which cannot take S's 384-channel stage 3; 384
# here, as its own comment ("3rd in_channels of decode_head") and its B config say.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
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
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
