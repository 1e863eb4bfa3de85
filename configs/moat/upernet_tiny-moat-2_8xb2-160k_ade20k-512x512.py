# UPerNet, tiny-MOAT-2 backbone, 160k iterations at batch 16 (8 GPUs x 2), ADE20K 512x512.
# The MOAT paper reports DeepLab heads (deeplab2); this is the common UPerNet 160k baseline on the same
# backbone, with the optimiser and schedule of mmseg's Swin UPerNet configs.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
channels = [56, 112, 224, 448]
model = dict(
    data_preprocessor=data_preprocessor,
    # mmseg would hand a string here to the backbone; AttnzooBackbone takes its weights below
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='tiny_moat_2',
        # feature 0 is the stride-2 stem; 1-4 are the stride-4..32 stages
        out_indices=(1, 2, 3, 4),
        # the official ImageNet-1K weights are TensorFlow checkpoints: convert them first
        # (python tools/convert.py <unpacked checkpoint> --model tiny_moat_2 -o tiny_moat_2.safetensors, see
        # model_cards/moat.md) and set checkpoint='tiny_moat_2.safetensors'
        pretrained=True,
        # window attention (14x14 at stride 16, 7x7 at stride 32; the 32x32 and 16x16 maps of a 512 crop
        # are padded to 42x42 / 21x21 with the padded keys masked) with global attention in the last block
        # of each MOAT stage, 3x3 shortcut pooling (deeplab2's get_model default for downstream tasks)
        window_size=(None, None, 14, 7),
        global_attention_at_end_of_moat_stage=True,
        shortcut_pool_size=3,
        drop_path_rate=0.1,
        # BatchNorm statistics stay at their ImageNet values (2 images per GPU; see the Mask R-CNN config)
        norm_eval=True),
    decode_head=dict(in_channels=channels, num_classes=150),
    auxiliary_head=dict(in_channels=channels[2], num_classes=150))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(custom_keys={
        'norm': dict(decay_mult=0.),
        'relative_position_bias_table': dict(decay_mult=0.),
    }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
