# Semantic FPN, BiFormer-S backbone, 80k iterations at batch 32 (8 GPUs x 4), ADE20K 512x512.
# Backbone options, optimiser and schedule as the official config
# (rayleizhu/BiFormer, semantic_segmentation/configs/ade20k/sfpn.biformer_small.py: UniFormer's recipe for
# 8 GPUs, i.e. twice mmseg's PVT learning rate for half its iterations; trained with mixed precision).
# Its test pipeline resizes to a multiple of 32 (UniFormer's AlignResize); mmseg's plain Resize is
# kept here, since the backbone pads any size itself.
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
        model_name='biformer_small',
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn; the
        # file is cached as biformer_small_in1k.pth in torch's hub cache ($TORCH_HOME/hub/checkpoints;
        # offline, put the official file there)
        pretrained=True,
        # the official BiFormer_mm: a LayerNorm2d on every output (trained with the decode head), and
        # routing on an 8 x 8 grid of regions ("training resolution is 512": 16 x 16-token regions at
        # stride 4), each map padded to a multiple of it (auto_pad)
        out_norm=True,
        n_win=8,
        drop_path_rate=0.15),
    neck=dict(in_channels=[64, 128, 256, 512]),
    decode_head=dict(num_classes=150))
# the official segmentation backbone converts its BatchNorms to SyncBatchNorm
sync_bn = 'torch'

optim_wrapper = dict(
    _delete_=True,
    # the official Fp16OptimizerHook(loss_scale=512.): mixed precision with a static loss scale
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001))
# the official CosineAnnealing policy: linear warm-up from 0.1x over 1000 iterations, down to 1e-8x
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=1000),
    dict(type='CosineAnnealingLR', T_max=79000, eta_min_ratio=1e-8, by_epoch=False, begin=1000, end=80000),
]
train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
