# UPerNet, HaloNet-26T backbone (timm's halonet26t), 160k iterations at batch 16 (8 GPUs x 2), ADE20K
# 512x512. HaloNet has no official segmentation setting; optimiser and schedule are the Swin / CSWin
# UPerNet recipe (AdamW lr 6e-5, weight decay 0.01, 1500 warm-up iterations, linear decay), with the
# backbone's BatchNorm statistics frozen (2 images per GPU).
# timm's HaloNet attends in fixed 8 x 8 blocks: 512 x 512 crops are multiples of its 256 px; other
# test sizes are padded to them and the maps cropped back.
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
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='halonet26t',
        out_indices=(1, 2, 3, 4),  # level 0 is the stride-2 stem
        pretrained=True,
        norm_eval=True),
    decode_head=dict(in_channels=[256, 512, 1024, 2048], num_classes=150),
    auxiliary_head=dict(in_channels=1024, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(norm_decay_mult=0., custom_keys={'pos_embed': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
