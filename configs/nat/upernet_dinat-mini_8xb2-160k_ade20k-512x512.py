# UPerNet, DiNAT-Mini backbone: the NAT-Mini config with the official
# DiNAT-Mini settings (SHI-Labs/Neighborhood-Attention-Transformer,
# segmentation/configs/dinat/upernet_dinat_mini_512x512_160k_ade20k.py).
# DiNAT dilations for dense tasks: larger than the classification ones, sized for the
# stage maps of 512 x 512 crops.
_base_ = './upernet_nat-mini_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        model_name='dinat_mini',
        drop_path_rate=0.2,
        dilations=((1, 16, 1), (1, 4, 1, 8), (1, 2, 1, 3, 1, 4), (1, 2, 1, 2, 1))),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
