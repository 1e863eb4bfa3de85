"""Writes the official-code fixture of tests/test_moat.py beside it, by running the official MOAT
(google-research/deeplab2, TensorFlow) on random weights:

* ``official.ckpt.*``: a TF1-style checkpoint of a reduced MOAT (stem 8/8, widths 16/16/32/32, 1/2/2/2
  blocks, head_dim 16, expansion 2, 10 classes) under the official variable names, as the official loader
  reads them (``moat/stem/...``, ``moat/block_SS_BB/...``), laid out as a TF1 training run with an EMA of the
  trainable variables leaves it: each trainable variable as an ``/ExponentialMovingAverage`` copy (the values
  the outputs were computed with) beside random trained values, the BatchNorm statistics plain, Adam
  slots for two variables, and ``global_step``;
* ``official_io.npz``: the official model's outputs (on images ``fixture_image`` computes) with those weights: logits of the
  classifier (global attention) on a 96x80 input (position tables resized 27x27 -> 11x9, 13x13 -> 5x5),
  and the stride-16 / stride-32 maps of the dense backbone (windows 4x4 / 2x2, global attention at the end
  of each MOAT stage, shortcut pool 3) on a 128x64 input;
* ``tiny_moat_0_variables.json``: name -> shape of every variable of the official tiny-MOAT-0 with and
  without position embedding (the full-size layout).

    TF_USE_LEGACY_KERAS=1 PYTHONPATH=/path/to/deeplab2/.. python tests/data/moat_official/make_fixture.py

Written with tensorflow-cpu 2.21.0 + tf-keras 2.21.0 and deeplab2 at its current main; neither is needed
to run the tests.
"""
import json
import os
import zlib
from pathlib import Path

import numpy as np
import tensorflow as tf

from deeplab2.model.pixel_encoder import moat as official

HERE = Path(__file__).resolve().parent
REDUCED = dict(stem_size=[8, 8], hidden_size=[16, 16, 32, 32], num_blocks=[1, 2, 2, 2], head_size=16, expansion_rate=2,
               kernel_initializer=tf.random_normal_initializer(stddev=0.1))


def build(size, head, **kwargs):
    tf.keras.utils.set_random_seed(0)  # the same initial values, position tables included, in both models
    override = dict(REDUCED, build_classification_head_with_class_num=10 if head else None)
    model = official.get_model('tiny_moat0_pretrain_256_1k', input_shape=[size[0], size[1], 3],
                               override_config=override, **kwargs)
    for var in model.variables:  # non-trivial norms (not the position tables: the official build reindexes them once)
        rng = np.random.default_rng(zlib.crc32(var.name.encode()))
        if 'moving_mean' in var.name or 'beta' in var.name:
            var.assign(rng.normal(0, 0.2, var.shape).astype(np.float32))
        elif 'moving_variance' in var.name or 'gamma' in var.name:
            var.assign(rng.uniform(0.5, 1.5, var.shape).astype(np.float32))
    return model


def fixture_image(height, width):
    """A [1, H, W, 3] image in [-1, 1) that tests/test_moat.py computes exactly the same way."""
    values = np.arange(height * width * 3) * 7919 % 1009
    return (values / 504.5 - 1).astype(np.float32).reshape(1, height, width, 3)


def checkpoint_names(model):
    """The official loader's names: the variable name without ':0', stem variables under 'moat/stem/'."""
    stem = {v.name for v in model._stem.variables}
    return {(official._STEM_LAYER_NAME_SCOPE if v.name in stem else '') + v.name[:-2]: v.numpy() for v in model.variables}


def main():
    rng = np.random.default_rng(0)
    classifier = build((96, 80), head=True, window_size=None, pool_size=2)
    dense = build((128, 64), head=False, window_size=[None, None, [4, 4], [2, 2]], pool_size=3,
                  global_attention_at_end_of_moat_stage=True)
    weights = checkpoint_names(classifier)
    for name, value in checkpoint_names(dense).items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)
    names, tensors = ['global_step'], [np.array(1234, dtype=np.int64)]
    for i, (name, value) in enumerate(weights.items()):
        if 'moving_' in name:
            names.append(name)
            tensors.append(value)
            continue
        names += [name, f'{name}/ExponentialMovingAverage']
        tensors += [rng.normal(0, 1, value.shape).astype(np.float32), value]
        if i < 2:
            names += [f'{name}/Adam', f'{name}/Adam_1']
            tensors += [np.zeros_like(value), np.ones_like(value)]
    tf.raw_ops.SaveV2(prefix=str(HERE / 'official.ckpt'), tensor_names=names, shape_and_slices=[''] * len(names),
                      tensors=[tf.constant(t) for t in tensors])

    x_cls, x_dense = fixture_image(96, 80), fixture_image(128, 64)
    endpoints = dense(x_dense, training=False)
    np.savez_compressed(HERE / 'official_io.npz', logits=classifier(x_cls, training=False).numpy(),
                        stage4=endpoints['stage4'].numpy(), stage5=endpoints['stage5'].numpy())

    layouts = {}
    for name in ('tiny_moat0_pretrain_256_1k', 'tiny_moat0_pretrain_256_no_pe_1k'):
        model = official.get_model(name, input_shape=[256, 256, 3], pool_size=2,
                                   override_config=dict(build_classification_head_with_class_num=1000))
        layouts[name] = {k: list(v.shape) for k, v in checkpoint_names(model).items()}
    (HERE / 'tiny_moat_0_variables.json').write_text(json.dumps(layouts, indent=0))


if __name__ == '__main__':
    main()
