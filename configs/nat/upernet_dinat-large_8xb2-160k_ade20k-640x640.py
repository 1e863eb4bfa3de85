# UPerNet, DiNAT-Large backbone, 160k iterations at batch 16 (8 GPUs x 2), ADE20K 640x640. The official
# DiNAT-Large setting (SHI-Labs/Neighborhood-Attention-Transformer,
# segmentation/configs/dinat/upernet_dinat_large_640x640_160k_ade20k.py): the NAT-Mini UPerNet recipe
# (AdamW lr 6e-5, weight decay 0.01 except on relative position biases and norms, 1500 warm-up
# iterations, poly decay, mixed precision) on 640 x 640 crops, drop path 0.3, dilations for 640 px.
# The official run starts from the ImageNet-22K checkpoint (dinat_large_in22k_224.pth); pretrained=True
# loads timm's dinat_large default, the 22K model fine-tuned on ImageNet-1K: pass the 22K file as
# checkpoint=... (with pretrained=False) for the paper's setting.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k_640x640.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

crop_size = (640, 640)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    # mmseg would hand a string here to the backbone; AttnzooBackbone takes its weights below
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='dinat_large',
        out_indices=(0, 1, 2, 3),
        pretrained=True,
        out_norm=True,
        drop_path_rate=0.3,
        dilations=((1, 20, 1), (1, 5, 1, 10), (1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5),
                   (1, 2, 1, 2, 1))),
    decode_head=dict(in_channels=[192, 384, 768, 1536], num_classes=150),
    auxiliary_head=dict(in_channels=768, num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={'rpb': dict(decay_mult=0.), 'norm': dict(decay_mult=0.)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
