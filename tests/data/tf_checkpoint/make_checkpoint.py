"""Writes tf_checkpoint.* beside it: a genuine TensorFlow checkpoint (the SaveV2 op, which tf.train.Saver and
tf.train.Checkpoint use), the ground truth of tests/test_tensorbundle.py for the format of tools/tensorbundle.py.

    TF_USE_LEGACY_KERAS=1 python tests/data/tf_checkpoint/make_checkpoint.py tests/data/tf_checkpoint/tf_checkpoint

Written with tensorflow-cpu 2.21.0; TensorFlow is not needed to run the tests.
"""
import sys
import numpy as np
import tensorflow as tf

prefix = sys.argv[1]
names, tensors = [], []
def add(name, value):
    names.append(name); tensors.append(tf.constant(value))

add('moat/stem/conv_0/kernel', np.arange(3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4) / 10)
add('moat/stem/conv_0/kernel/ExponentialMovingAverage', -np.arange(3 * 3 * 3 * 4, dtype=np.float32).reshape(3, 3, 3, 4) / 10)
add('half', np.linspace(-2, 2, 7).astype(np.float16))
add('brain', tf.cast(tf.constant(np.linspace(-3, 3, 5).astype(np.float32)), tf.bfloat16).numpy())
add('double', np.array([[1.5, -2.25]], dtype=np.float64))
add('global_step', np.array(123456789012, dtype=np.int64))
add('int32', np.array([-7, 0, 7], dtype=np.int32))
add('flags', np.array([True, False, True]))
add('empty', np.zeros((0, 3), dtype=np.float32))
add('words', np.array([b'not', b'numeric']))
# enough keys for several 4 KiB index blocks and restart points (every 16 keys)
for i in range(400):
    add(f'filler/layer_{i:03d}/weight', np.full((2,), i, dtype=np.float32))
tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[''] * len(names), tensors=tensors)
print('wrote', len(names), 'tensors')
