# UPerNet, NAT-Small backbone: the NAT-Mini config with the official
# NAT-Small settings (SHI-Labs/Neighborhood-Attention-Transformer,
# segmentation/configs/nat/upernet_nat_small_512x512_160k_ade20k.py).
_base_ = './upernet_nat-mini_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        model_name='nat_small',
        drop_path_rate=0.5),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
