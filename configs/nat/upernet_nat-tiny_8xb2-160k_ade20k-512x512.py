# UPerNet, NAT-Tiny backbone: the NAT-Mini config with the official
# NAT-Tiny settings (SHI-Labs/Neighborhood-Attention-Transformer,
# segmentation/configs/nat/upernet_nat_tiny_512x512_160k_ade20k.py).
_base_ = './upernet_nat-mini_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        model_name='nat_tiny',
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
