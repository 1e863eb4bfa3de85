# UPerNet, DaViT-T backbone (timm's davit_tiny), 160k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# The official DaViT setting (dingmyu/davit, mmseg/configs/upernet_davit_512x512_160k_ade20k.py):
# a LayerNorm on every backbone output, drop path 0.3, AdamW lr 6e-5, weight decay 0.01, 1500 linear
# warm-up iterations, then linear (poly, power 1) decay to 0.
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
        model_name='davit_tiny',
        out_indices=(0, 1, 2, 3),
        # timm's ImageNet-1K weights (the official release); offline: pretrained=False,
        # checkpoint='/path/to/davit_tiny.pth'
        pretrained=True,
        out_norm=True,
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[96, 192, 384, 768], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

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
