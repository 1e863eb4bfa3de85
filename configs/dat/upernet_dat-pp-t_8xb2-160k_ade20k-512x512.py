# UPerNet, DAT-T++ backbone, 160k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# As the official DAT-Segmentation config configs/dat/upn_tiny_160k_dp03_lr6.py (mIoU 49.4, 50.3 multi-scale):
# drop path 0.3, AdamW lr 6e-5 / weight decay 0.01, linear warmup 1500 iterations then poly, fp16.
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
        model_name='dat_pp_tiny',
        out_indices=(0, 1, 2, 3),
        # the official ImageNet-1K weights sit on share pages timm cannot download: download
        # dat_pp_tiny_in1k_224.pth (github.com/LeapLabTHU/DAT) and set
        # pretrained=False, checkpoint='/path/to/dat_pp_tiny_in1k_224.pth' (converted by attnzoo)
        pretrained=True,
        # the official segmentation backbone: a LayerNorm on every output, gradient checkpointing
        out_norm=True,
        with_cp=True,
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    # no weight decay on the deformable bias tables and the norms, as the official config
    paramwise_cfg=dict(custom_keys={'rpe_table': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
