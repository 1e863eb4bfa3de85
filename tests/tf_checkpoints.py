"""Writes TensorFlow checkpoints (TensorBundle: ``PREFIX.index`` + ``PREFIX.data-00000-of-00001``) for tests,
without TensorFlow, following TensorFlow's ``core/util/tensor_bundle`` (``BundleWriter``) and the table
format of ``core/lib/io/table_builder.cc``: one uncompressed data block of the sorted entries (a restart
point every 16 keys), an index block with one entry, an empty metaindex block, the 48-byte footer. CRCs
are written as zeros (readers that skip them, as tools/tensorbundle.py does, read the file).

tests/data/tf_checkpoint/ holds a checkpoint written by TensorFlow itself, the reference for the format.
"""
import struct
from typing import Dict, Tuple

import numpy as np
import torch

TABLE_MAGIC = 0xdb4775248b80fb57
RESTART_INTERVAL = 16
NUMPY_TO_TF_DTYPE = {
    np.dtype('float32'): 1, np.dtype('float64'): 2, np.dtype('int32'): 3, np.dtype('uint8'): 4,
    np.dtype('int16'): 5, np.dtype('int8'): 6, np.dtype('int64'): 9, np.dtype('bool'): 10, np.dtype('float16'): 19,
}


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7f
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, value) -> bytes:
    """One protobuf field: ints as varints (wire type 0), bytes as length-delimited (2)."""
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    return varint(number << 3) + varint(value)


def entry_proto(dtype: int, shape: Tuple[int, ...], offset: int, size: int) -> bytes:
    dims = b''.join(field(2, field(1, dim)) for dim in shape)
    return field(1, dtype) + field(2, dims) + field(3, 0) + field(4, offset) + field(5, size)


def block(entries) -> bytes:
    """A table block: prefix-compressed entries, restart offsets, restart count."""
    out, restarts, previous = bytearray(), [], b''
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % RESTART_INTERVAL == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + b''.join(struct.pack('<I', r) for r in restarts) + struct.pack('<I', len(restarts))


def write_tensor_bundle(prefix: str, tensors: Dict[str, np.ndarray]) -> None:
    """Writes ``tensors`` (name -> array or tensor) as the checkpoint ``prefix``."""
    data, entries = bytearray(), []
    for name in sorted(tensors):
        value = tensors[name]
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder('<')).tobytes()
        entries.append((name.encode(), entry_proto(NUMPY_TO_TF_DTYPE[array.dtype], array.shape, len(data), len(raw))))
        data += raw
    header = field(1, 1) + field(2, 0) + field(3, field(1, 1))  # one shard, little-endian, version 1
    entries.insert(0, (b'', header))

    table = bytearray()

    def add_block(contents: bytes) -> bytes:
        handle = varint(len(table)) + varint(len(contents))
        table.extend(contents + b'\x00' + b'\x00' * 4)  # uncompressed, CRC left zero
        return handle

    data_handle = add_block(block(entries))
    metaindex_handle = add_block(block([]))
    index_handle = add_block(block([(entries[-1][0], data_handle)]))
    footer = metaindex_handle + index_handle
    table += footer + b'\x00' * (40 - len(footer)) + struct.pack('<Q', TABLE_MAGIC)
    with open(f'{prefix}.index', 'wb') as f:
        f.write(table)
    with open(f'{prefix}.data-00000-of-00001', 'wb') as f:
        f.write(data)
