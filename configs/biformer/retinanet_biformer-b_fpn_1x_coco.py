# RetinaNet, BiFormer-B backbone, FPN, 1x schedule (12 epochs), COCO detection.
# As the BiFormer-S config, with the official BiFormer-B options
# (rayleizhu/BiFormer, object_detection/configs/coco/retinanet.1x.biformer_base.py).
_base_ = ['./retinanet_biformer-s_fpn_1x_coco.py']

model = dict(
    backbone=dict(
        model_name='biformer_base',
        # the official file: biformer_base_in1k.pth in torch's hub cache
        drop_path_rate=0.3),
    neck=dict(in_channels=[192, 384, 768]))
