"""What the papers say about each family and variant: the one source the model cards and the README's zoo
table are generated from (``python tools/benchmark.py cards``; ``models --family all`` measures and then
regenerates them).

Only facts that no code holds live here: the ImageNet-1k top-1 and its resolution as the paper (or the
official README, ``top1_source``) reports them, the pre-training data, the official repository, the fused
kernel the family calls and the citation. What the code knows is read from the code, never copied: the
parameter count and multiply-adds (measured by tools/benchmark.py), the license of the official weights
(each variant's ``pretrained_cfg['license']``), the default input size (``pretrained_cfg['input_size']``)
and the det / seg configs (``configs/<family>/*.py``, by their ``model_name``).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

# the attention ops of attnzoo.kernels (README "Kernels"); a family on none of them runs timm's
# F.scaled_dot_product_attention (or an explicit softmax)
NEIGHBORHOOD = 'neighborhood_attention_2d'
ROUTING = 'routing_attention'


@dataclass(frozen=True)
class Variant:
    name: str                      # the timm model name
    top1: Optional[float]          # ImageNet-1k top-1 (%) as the paper reports it; None: the paper has no such model
    resolution: int                # the resolution of that top-1 (and of the variant's default input size)
    pretrain: str = 'in1k'         # 'in22k': pre-trained on ImageNet-22k, fine-tuned on ImageNet-1k
    note: str = ''                 # a short qualifier shown beside the top-1


@dataclass(frozen=True)
class Family:
    card: str                      # model_cards/<card>.md; also configs/<card>/
    title: str                     # the card's and the table's name of the family
    paper: str                     # authors, venue, year
    module: str                    # the module that registers the variants: attnzoo.backbones.X or timm.models.X
    official_repo: Optional[str]   # None: no official code was released
    top1_source: str               # where the top-1 figures are copied from
    kernel: Optional[str]          # the attnzoo.kernels op the family runs on; None: SDPA / explicit attention
    citation: str                  # BibTeX, as the official README gives it where it gives one
    variants: Tuple[Variant, ...]
    tags: Tuple[str, ...] = ()     # extra Hugging Face tags
    timm_native: bool = False      # implemented by timm; attnzoo adds conformance, dense configs, cards

    def variant_names(self):
        return [v.name for v in self.variants]


def _v(names_top1, resolution=224, **kwargs):
    return tuple(Variant(name, top1, resolution, **kwargs) for name, top1 in names_top1)


FAMILIES = (
    Family(
        card='biformer', title='BiFormer', paper='Zhu et al., CVPR 2023',
        module='attnzoo.backbones.biformer', official_repo='https://github.com/rayleizhu/BiFormer',
        top1_source='official README', kernel=ROUTING, tags=('bi-level-routing-attention',),
        variants=_v([('biformer_tiny', 81.4), ('biformer_small', 83.8), ('biformer_base', 84.3)]),
        citation='''@Article{zhu2023biformer,
  author  = {Lei Zhu and Xinjiang Wang and Zhanghan Ke and Wayne Zhang and Rynson Lau},
  title   = {BiFormer: Vision Transformer with Bi-Level Routing Attention},
  journal = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year    = {2023},
}'''),
    Family(
        card='crossformer', title='CrossFormer / CrossFormer++', paper='Wang et al., ICLR 2022; TPAMI 2023',
        module='attnzoo.backbones.crossformer', official_repo='https://github.com/cheerss/CrossFormer',
        top1_source='official README', kernel=None, tags=('cross-scale-attention',),
        variants=_v([('crossformer_tiny', 81.5), ('crossformer_small', 82.5), ('crossformer_base', 83.4),
                     ('crossformer_large', 84.0), ('crossformer_pp_small', 83.2), ('crossformer_pp_base', 84.2),
                     ('crossformer_pp_large', 84.7), ('crossformer_pp_huge', 84.9)]),
        citation='''@inproceedings{wang2021crossformer,
  title = {CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention},
  author = {Wenxiao Wang and Lu Yao and Long Chen and Binbin Lin and Deng Cai and Xiaofei He and Wei Liu},
  booktitle = {International Conference on Learning Representations, {ICLR}},
  url = {https://openreview.net/forum?id=_PHymLIxuI},
  year = {2022}
}

@article{wang2023crossformer++,
  author       = {Wenxiao Wang and Wei Chen and Qibo Qiu and Long Chen and Boxi Wu and Binbin Lin and Xiaofei He and Wei Liu},
  title        = {Crossformer++: A versatile vision transformer hinging on cross-scale attention},
  journal      = {{IEEE} Transactions on Pattern Analysis and Machine Intelligence, {TPAMI}},
  year         = {2023},
  doi          = {10.1109/TPAMI.2023.3341806},
}'''),
    Family(
        card='cswin', title='CSWin Transformer', paper='Dong et al., CVPR 2022',
        module='attnzoo.backbones.cswin', official_repo='https://github.com/microsoft/CSWin-Transformer',
        top1_source='official README', kernel=None, tags=('cross-shaped-window-attention',),
        variants=(_v([('cswin_tiny_224', 82.8), ('cswin_small_224', 83.6), ('cswin_base_224', 84.2)])
                  + _v([('cswin_large_224', 86.5)], pretrain='in22k')
                  + _v([('cswin_base_384', 85.5)], 384)
                  + _v([('cswin_large_384', 87.5)], 384, pretrain='in22k')),
        citation='''@misc{dong2021cswin,
  title         = {CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows},
  author        = {Xiaoyi Dong and Jianmin Bao and Dongdong Chen and Weiming Zhang and Nenghai Yu and
                   Lu Yuan and Dong Chen and Baining Guo},
  year          = {2021},
  eprint        = {2107.00652},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV}
}'''),
    Family(
        card='dat', title='DAT++', paper='Xia et al., arXiv 2309.01430 (DAT: CVPR 2022)',
        module='attnzoo.backbones.dat', official_repo='https://github.com/LeapLabTHU/DAT',
        top1_source='official README', kernel=NEIGHBORHOOD, tags=('deformable-attention',),
        variants=(_v([('dat_pp_tiny', 83.9), ('dat_pp_small', 84.6), ('dat_pp_base', 84.9)])
                  + _v([('dat_pp_base_384', 85.9)], 384)),
        citation='''@article{xia2023dat,
  title   = {DAT++: Spatially Dynamic Vision Transformer with Deformable Attention},
  author  = {Zhuofan Xia and Xuran Pan and Shiji Song and Li Erran Li and Gao Huang},
  year    = {2023},
  journal = {arXiv preprint arXiv:2309.01430}
}

@inproceedings{xia2022vision,
  title     = {Vision Transformer With Deformable Attention},
  author    = {Xia, Zhuofan and Pan, Xuran and Song, Shiji and Li, Li Erran and Huang, Gao},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022},
  pages     = {4794-4803}
}'''),
    Family(
        card='davit', title='DaViT', paper='Ding et al., ECCV 2022',
        module='timm.models.davit', official_repo='https://github.com/dingmyu/davit',
        top1_source='official README', kernel=None, timm_native=True, tags=('channel-attention',),
        variants=_v([('davit_tiny', 82.8), ('davit_small', 84.2), ('davit_base', 84.6)]),
        citation='''@inproceedings{ding2022davit,
  title     = {DaViT: Dual Attention Vision Transformers},
  author    = {Ding, Mingyu and Xiao, Bin and Codella, Noel and Luo, Ping and Wang, Jingdong and Yuan, Lu},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2022}
}'''),
    Family(
        card='halonet', title='HaloNet', paper='Vaswani et al., CVPR 2021',
        module='timm.models.byoanet', official_repo=None,   # the paper's code was never released
        top1_source='paper', kernel=None, timm_native=True, tags=('blocked-local-attention',),
        # timm's HaloNets are timm's own designs, not the paper's H0-H7 (the paper's table could not be
        # confirmed from a stored source either): no paper top-1 belongs to them
        variants=_v([('halonet_h1', None), ('halonet26t', None), ('sehalonet33ts', None), ('halonet50ts', None),
                     ('eca_halonext26ts', None)], 256),
        citation='''@inproceedings{vaswani2021scaling,
  title     = {Scaling Local Self-Attention for Parameter Efficient Visual Backbones},
  author    = {Vaswani, Ashish and Ramachandran, Prajit and Srinivas, Aravind and Parmar, Niki and
               Hechtman, Blake and Shlens, Jonathon},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2021}
}'''),
    Family(
        card='litv2', title='LITv2 (HiLo attention)', paper='Pan, Cai and Zhuang, NeurIPS 2022',
        module='attnzoo.backbones.litv2', official_repo='https://github.com/ziplab/LITv2',
        top1_source='official README', kernel=None, tags=('hilo-attention',),
        variants=(_v([('litv2_small', 82.0), ('litv2_medium', 83.3), ('litv2_base', 83.6)])
                  + _v([('litv2_base_384', 84.7)], 384)),
        citation='''@inproceedings{pan2022hilo,
  title     = {Fast Vision Transformers with HiLo Attention},
  author    = {Pan, Zizheng and Cai, Jianfei and Zhuang, Bohan},
  booktitle = {NeurIPS},
  year      = {2022}
}'''),
    Family(
        card='maxvit', title='MaxViT', paper='Tu et al., ECCV 2022',
        module='timm.models.maxxvit', official_repo='https://github.com/google-research/maxvit',
        top1_source='official README', kernel=None, timm_native=True, tags=('multi-axis-attention',),
        variants=(_v([('maxvit_tiny_tf_224', 83.62)]) + _v([('maxvit_tiny_tf_384', 85.24)], 384)
                  + _v([('maxvit_tiny_tf_512', 85.72)], 512)
                  + _v([('maxvit_small_tf_224', 84.45), ('maxvit_base_tf_224', 84.95),
                        ('maxvit_large_tf_224', 85.17)])),
        citation='''@inproceedings{tu2022maxvit,
  title     = {MaxViT: Multi-Axis Vision Transformer},
  author    = {Tu, Zhengzhong and Talebi, Hossein and Zhang, Han and Yang, Feng and Milanfar, Peyman and
               Bovik, Alan and Li, Yinxiao},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2022}
}'''),
    Family(
        card='moat', title='MOAT / tiny-MOAT', paper='Yang et al., ICLR 2023',
        module='attnzoo.backbones.moat', official_repo='https://github.com/google-research/deeplab2',
        top1_source='official README', kernel=None, tags=('mobile-convolution-attention',),
        variants=(_v([('moat_0', 83.3), ('moat_1', 84.2)]) + _v([('moat_2', 87.5)], 384, pretrain='in22k')
                  + _v([('moat_3', 88.4), ('moat_4', 89.1)], 512, pretrain='in22k')
                  + _v([('tiny_moat_0', 76.6), ('tiny_moat_1', 79.2), ('tiny_moat_2', 81.7),
                        ('tiny_moat_3', 83.3)], 256)
                  + _v([('moat_0_no_pe', 83.0), ('moat_1_no_pe', 84.1)])
                  + _v([('moat_2_no_pe', 87.2)], 384, pretrain='in22k')
                  + _v([('moat_3_no_pe', 88.2), ('moat_4_no_pe', 88.9)], 512, pretrain='in22k')
                  + _v([('tiny_moat_0_no_pe', 76.0), ('tiny_moat_1_no_pe', 78.9), ('tiny_moat_2_no_pe', 81.3),
                        ('tiny_moat_3_no_pe', 83.0)], 256)),
        citation='''@inproceedings{yang2023moat,
  title     = {{MOAT}: Alternating Mobile Convolution and Attention Brings Strong Vision Models},
  author    = {Chenglin Yang and Siyuan Qiao and Qihang Yu and Xiaoding Yuan and Yukun Zhu and
               Alan Yuille and Hartwig Adam and Liang-Chieh Chen},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}'''),
    Family(
        card='nat', title='NAT / DiNAT', paper='Hassani et al., CVPR 2023; Hassani and Shi, arXiv 2022',
        module='attnzoo.backbones.nat', official_repo='https://github.com/SHI-Labs/Neighborhood-Attention-Transformer',
        top1_source='official README', kernel=NEIGHBORHOOD, tags=('neighborhood-attention',),
        variants=(_v([('nat_mini', 81.8), ('nat_tiny', 83.2), ('nat_small', 83.7), ('nat_base', 84.3),
                      ('dinat_mini', 81.8), ('dinat_tiny', 82.7), ('dinat_small', 83.8), ('dinat_base', 84.4)])
                  + _v([('dinat_large', 86.6)], pretrain='in22k')
                  + _v([('dinat_large_384', 87.4), ('dinat_large_384_11x11', 87.5)], 384, pretrain='in22k')),
        citation='''@inproceedings{hassani2023neighborhood,
  title     = {Neighborhood Attention Transformer},
  author    = {Ali Hassani and Steven Walton and Jiachen Li and Shen Li and Humphrey Shi},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  month     = {June},
  year      = {2023},
  pages     = {6185-6194}
}
@article{hassani2022dilated,
  title         = {Dilated Neighborhood Attention Transformer},
  author        = {Ali Hassani and Humphrey Shi},
  year          = 2022,
  url           = {https://arxiv.org/abs/2209.15001},
  eprint        = {2209.15001},
  archiveprefix = {arXiv},
  primaryclass  = {cs.CV}
}'''),
    Family(
        card='shvit', title='SHViT', paper='Yun and Ro, CVPR 2024',
        module='timm.models.shvit', official_repo='https://github.com/ysj9909/SHViT',
        top1_source='official README', kernel=None, timm_native=True, tags=('single-head-attention',),
        variants=_v([('shvit_s1', 72.8), ('shvit_s2', 75.2), ('shvit_s3', 77.4)]) + _v([('shvit_s4', 79.4)], 256),
        citation='''@inproceedings{yun2024shvit,
  title     = {SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design},
  author    = {Yun, Seokju and Ro, Youngmin},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}'''),
    Family(
        card='transnext', title='TransNeXt', paper='Dai Shi, CVPR 2024',
        module='attnzoo.backbones.transnext', official_repo='https://github.com/DaiShiResearch/TransNeXt',
        top1_source='official README', kernel=NEIGHBORHOOD, tags=('aggregated-attention',),
        variants=(_v([('transnext_micro', 82.5), ('transnext_tiny', 84.0), ('transnext_small', 84.7),
                      ('transnext_base', 84.8)])
                  + _v([('transnext_small_384', 86.0), ('transnext_base_384', 86.2)], 384)
                  + _v([('transnext_micro_aaaa_256', 82.6)], 256)),
        citation='''@InProceedings{shi2023transnext,
  author    = {Dai Shi},
  title     = {TransNeXt: Robust Foveal Visual Perception for Vision Transformers},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  month     = {June},
  year      = {2024},
  pages     = {17773-17783}
}'''),
)

BY_CARD = {family.card: family for family in FAMILIES}
DATASETS = {'in1k': ('imagenet-1k',), 'in22k': ('imagenet-22k', 'imagenet-1k')}


def family(name):
    """The family whose card is ``name`` (e.g. 'biformer'); an error lists the known ones."""
    if name not in BY_CARD:
        raise ValueError(f'unknown family {name!r}; known: {", ".join(sorted(BY_CARD))} (or "all")')
    return BY_CARD[name]


def family_of(variant):
    """The family a variant name belongs to; an error says that the zoo does not list it."""
    for fam in FAMILIES:
        if variant in fam.variant_names():
            return fam
    raise ValueError(f'{variant!r} is not a zoo variant (tools/benchlib/zoo.py lists every family\'s variants)')


def all_variants():
    return [v for fam in FAMILIES for v in fam.variants]
