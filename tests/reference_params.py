"""Exact parameter counts (1000-class head) of the official models.

Copied from ../shared/reference/backbones.md, where they were computed by instantiating the
official code and summing ``p.numel()``. A faithful re-implementation must hit the same integer.

Where each count comes from, for the timm-native families (attnzoo does not re-implement them):
- DaViT: the official code (dingmyu/davit, a vendored timm fork); its file also prints these exact
  counts in comments ("params: 28360168", ...). An independent source: timm must match it.
- SHViT: the official code (ysj9909/SHViT) instantiated, unfused (as its checkpoints are). Independent.
- MaxViT: the official code is TensorFlow and was not run; the exact counts are **timm's own**, so that
  test compares timm with itself. The independent check is the rounded count the official README
  prints (``README_PARAMS_M``).
- HaloNet: there is no official code (the paper's was never released); the exact counts are **timm's
  own** and nothing independent exists to check them against (the paper's H1 figure of 8.1M could
  not be confirmed from a stored source, so it is not used).
"""

OFFICIAL_PARAMS = {
    # BiFormer (rayleizhu/BiFormer)
    'biformer_tiny': 13_142_760,
    'biformer_small': 25_536_232,
    'biformer_base': 56_804_968,
    # CSWin (microsoft/CSWin-Transformer)
    'cswin_tiny_224': 22_320_552,
    'cswin_small_224': 34_643_304,
    'cswin_base_224': 77_382_184,
    'cswin_base_384': 77_382_184,
    'cswin_large_224': 173_262_664,
    'cswin_large_384': 173_262_664,
    # LITv2 / HiLo (ziplab/LITv2; alpha 0.9, windows (0, 0, 2, 1))
    'litv2_small': 27_844_000,
    'litv2_medium': 48_830_368,
    'litv2_base': 86_520_704,
    'litv2_base_384': 86_520_704,
    # NAT / DiNAT (SHI-Labs/Neighborhood-Attention-Transformer)
    'nat_mini': 19_984_174,
    'nat_tiny': 27_901_582,
    'nat_small': 50_743_297,
    'nat_base': 89_769_652,
    'dinat_mini': 19_984_174,
    'dinat_tiny': 27_901_582,
    'dinat_small': 50_719_681,
    'dinat_base': 89_769_652,
    'dinat_large': 200_943_514,
    'dinat_large_384': 200_943_514,
    'dinat_large_384_11x11': 201_144_250,
    # CrossFormer / CrossFormer++ (cheerss/CrossFormer; v1 counts are the same on the old branch)
    'crossformer_tiny': 27_776_794,
    'crossformer_small': 30_657_394,
    'crossformer_base': 51_971_554,
    'crossformer_large': 91_971_184,
    'crossformer_pp_small': 23_325_340,
    'crossformer_pp_base': 51_994_594,
    'crossformer_pp_large': 92_001_904,
    'crossformer_pp_huge': 95_962_944,
    # DAT++ (LeapLabTHU/DAT; configs/dat_base_384.yaml keeps MODEL.DAT.img_size 224: the 384 model has
    # the 224 model's deformable bias tables)
    'dat_pp_tiny': 23_962_876,
    'dat_pp_small': 53_127_366,
    'dat_pp_base': 93_690_640,
    'dat_pp_base_384': 93_690_640,
    # MOAT / tiny-MOAT (google-research/deeplab2, TensorFlow): counted on a PyTorch replica of the official
    # code (reference section 7); every count matches the README's one-decimal figure
    'moat_0': 27_846_892,
    'moat_1': 41_598_448,
    'moat_2': 73_422_408,
    'moat_3': 189_958_040,
    'moat_4': 483_214_184,
    'moat_0_no_pe': 27_777_544,
    'moat_1_no_pe': 41_467_864,
    'moat_2_no_pe': 73_248_296,
    'moat_3_no_pe': 189_536_280,
    'moat_4_no_pe': 482_539_368,
    'tiny_moat_0': 3_355_348,
    'tiny_moat_1': 5_122_895,
    'tiny_moat_2': 9_772_741,
    'tiny_moat_3': 19_534_390,
    'tiny_moat_0_no_pe': 3_332_232,
    'tiny_moat_1_no_pe': 5_094_000,
    'tiny_moat_2_no_pe': 9_732_288,
    'tiny_moat_3_no_pe': 19_476_600,
    # TransNeXt (DaiShiResearch/TransNeXt)
    'transnext_micro': 12_809_304,
    'transnext_tiny': 28_258_960,
    'transnext_small': 49_741_564,
    'transnext_base': 89_721_496,
    'transnext_small_384': 49_741_564,
    'transnext_base_384': 89_721_496,
    'transnext_micro_aaaa_256': 13_114_008,
    # timm-native families attnzoo supports (timm 1.0.31); provenance in the docstring above
    # MaxViT: timm's own counts (official code is TensorFlow)
    'maxvit_tiny_tf_224': 30_916_528,
    'maxvit_tiny_tf_384': 30_977_008,
    'maxvit_tiny_tf_512': 31_049_584,
    'maxvit_small_tf_224': 68_927_956,
    'maxvit_base_tf_224': 119_467_708,
    'maxvit_large_tf_224': 211_785_560,
    # DaViT: official code (and the counts printed in its file)
    'davit_tiny': 28_360_168,
    'davit_small': 49_745_896,
    'davit_base': 87_954_408,
    # SHViT: official code, unfused
    'shvit_s1': 6_330_808,
    'shvit_s2': 11_483_072,
    'shvit_s3': 14_245_273,
    'shvit_s4': 16_588_484,
    # HaloNet: timm's own counts (no official code exists)
    'halonet_h1': 8_100_056,
    'halonet26t': 12_480_288,
    'sehalonet33ts': 13_691_712,
    'halonet50ts': 22_733_280,
    'eca_halonext26ts': 10_756_885,
}

# The rounded counts (millions) the official MaxViT README prints ("#Params"): the independent check of
# the MaxViT counts above, which only timm could give.
README_PARAMS_M = {
    'maxvit_tiny_tf_224': 31,
    'maxvit_tiny_tf_384': 31,
    'maxvit_tiny_tf_512': 31,
    'maxvit_small_tf_224': 69,
    'maxvit_base_tf_224': 119,
    'maxvit_large_tf_224': 212,
}
