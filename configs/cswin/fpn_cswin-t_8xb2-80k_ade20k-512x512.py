# Semantic FPN, CSWin-T backbone, 80k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# The official CSWin repository publishes only UPerNet configs (its README reports Semantic FPN at
# 80k iterations). Optimiser and schedule: PVT's Semantic FPN recipe (AdamW, lr 1e-4, weight decay
# 1e-4, poly decay to 0 with power 0.9, batch 16), as in mmseg's PVT / Twins configs; backbone
# options: the official CSWin-T segmentation ones.
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
        model_name='cswin_tiny_224',
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn;
        # offline: pretrained=False, checkpoint='/path/to/cswin_tiny_224.pth'
        pretrained=True,
        # the official CSWin segmentation backbone: a LayerNorm on every output, stripe widths 1/2/7/7
        out_norm=True,
        split_size=(1, 2, 7, 7),
        drop_path_rate=0.3),
    neck=dict(in_channels=[64, 128, 256, 512]),
    decode_head=dict(num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001))
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=80000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
