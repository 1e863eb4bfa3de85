# Semantic FPN, LITv2-S backbone (HiLo window 2), 80k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# As the official config (ziplab/LITv2, segmentation/configs/litv2/litv2_s_fpn_r50_512x512_80k_ade20k.py):
# AdamW lr 1e-4, weight decay 1e-4, poly decay (power 0.9) to 1e-6 over 80k iterations, no warm-up,
# a LayerNorm on every backbone output.
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
        model_name='litv2_small',
        # HiLo window of stage 3 (the official README's "window size"); stage 4 attends globally
        window_size=2,
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn;
        # offline: pretrained=False, checkpoint='/path/to/litv2_s.pth'
        pretrained=True,
        out_norm=True,
        drop_path_rate=0.2),
    neck=dict(in_channels=[96, 192, 384, 768]),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001))
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-6, power=0.9, begin=0, end=80000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
