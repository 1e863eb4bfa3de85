# UPerNet, MaxViT-T backbone (timm's maxvit_tiny_tf_224), 160k iterations at batch 16 (8 GPUs x 2),
# ADE20K 512x512. The MaxViT paper reports no ADE20K result; optimiser and schedule are the Swin / CSWin
# UPerNet recipe (AdamW lr 6e-5, weight decay 0.01, 1500 warm-up iterations, linear decay), drop path 0.3.
# timm's MaxViT partitions every stage into fixed 7 x 7 windows / grids: AttnzooBackbone pads the
# 512 x 512 crops to 672 x 672 (multiples of 32 x 7) and crops the maps back.
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
        model_name='maxvit_tiny_tf_224',
        out_indices=(1, 2, 3, 4),  # level 0 is the stride-2 stem
        pretrained=True,
        out_norm=True,
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.), 'rel_pos': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
