# UPerNet, SHViT-S4 backbone (timm's shvit_s4), 160k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# SHViT publishes no segmentation setting; optimiser and schedule are the Swin / CSWin UPerNet recipe
# (AdamW lr 6e-5, weight decay 0.01, 1500 warm-up iterations, linear decay). SHViT's three feature
# levels (strides 16, 32, 64) feed UPerNet's pyramid; the auxiliary FCN head reads the stride-32 level.
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
        model_name='shvit_s4',
        out_indices=(0, 1, 2),
        pretrained=True),
    decode_head=dict(in_channels=[224, 336, 448], in_index=[0, 1, 2], num_classes=150),
    auxiliary_head=dict(in_channels=336, in_index=1, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
