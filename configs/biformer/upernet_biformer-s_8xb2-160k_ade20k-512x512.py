# UPerNet, BiFormer-S backbone, 160k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# Backbone options, optimiser and schedule as the official config
# (rayleizhu/BiFormer, semantic_segmentation/configs/ade20k/upernet.biformer_small.py: the UniFormer /
# CSWin recipe, trained with mixed precision).
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
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150))
# the official segmentation backbone converts its BatchNorms to SyncBatchNorm (batch 2 per GPU)
sync_bn = 'torch'

optim_wrapper = dict(
    _delete_=True,
    # the official Fp16OptimizerHook(loss_scale=512.): mixed precision with a static loss scale
    type='AmpOptimWrapper',
    loss_scale=512.,
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
