# UPerNet, DiNAT-Small backbone: the NAT-Mini config with the official
# DiNAT-Small settings (SHI-Labs/Neighborhood-Attention-Transformer,
# segmentation/configs/dinat/upernet_dinat_small_512x512_160k_ade20k.py).
# DiNAT dilations for dense tasks: larger than the classification ones, sized for the
# stage maps of 512 x 512 crops.
_base_ = './upernet_nat-mini_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        model_name='dinat_small',
        drop_path_rate=0.5,
        dilations=((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4, 1, 2, 1, 3, 1, 4), (1, 2, 1, 2, 1))),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
