# Mask R-CNN, BiFormer-S backbone, FPN, 1x schedule (12 epochs), COCO instance segmentation.
# Backbone options, optimiser and schedule as the official config
# (rayleizhu/BiFormer, object_detection/configs/coco/maskrcnn.1x.biformer_small.py: UniFormer's recipe,
# trained with mixed precision on 8 GPUs x 2 images).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['attnzoo.heads'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='AttnzooBackbone',
        model_name='biformer_small',
        out_indices=(0, 1, 2, 3),
        # ImageNet-1K weights of the official release, converted by attnzoo's checkpoint_filter_fn; the
        # file is cached as biformer_small_in1k.pth in torch's hub cache ($TORCH_HOME/hub/checkpoints;
        # offline, put the official file there)
        pretrained=True,
        # the official BiFormer_mm: a LayerNorm2d on every output (trained with the detector), and
        # routing on a fixed 16 x 16 grid of regions, each map padded to a multiple of it (auto_pad)
        out_norm=True,
        n_win=16,
        # BiFormer_mm's default for detection: BatchNorm statistics stay those of ImageNet
        norm_eval=True,
        drop_path_rate=0.2),
    neck=dict(in_channels=[64, 128, 256, 512]))

optim_wrapper = dict(
    # the official fp16=dict(): mixed precision with a static loss scale of 512
    type='AmpOptimWrapper',
    loss_scale=512.,
    # no weight decay on norms (the LayerNorms inside BiFormer and the output norms)
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}),
    optimizer=dict(_delete_=True, type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05))
