"""Reads TensorFlow checkpoints (the TensorBundle format: ``PREFIX.index`` + ``PREFIX.data-SSSSS-of-NNNNN``)
without TensorFlow.

The format, as TensorFlow's ``core/util/tensor_bundle`` writes it (``tf.train.Saver``, ``tf.train.Checkpoint``,
the ``SaveV2`` op):

* ``PREFIX.index`` is an immutable sorted string table (LevelDB's table format, ``core/lib/io/table``):
  data blocks of prefix-compressed key / value entries, an index block pointing at them, and a 48-byte
  footer (the two block handles, then the magic number). Each block is followed by a 5-byte trailer
  (compression type, CRC). The key ``""`` holds a ``BundleHeaderProto`` (number of data shards,
  endianness); every other key is a tensor name whose value is a ``BundleEntryProto`` (dtype, shape,
  shard, offset and size of its bytes in the data file).
* ``PREFIX.data-SSSSS-of-NNNNN`` hold the raw tensor bytes, little-endian, row-major.

The protocol buffers are decoded by hand (a dozen fields), so the one dependency is torch. CRCs are not
checked (pure Python would take minutes on a large checkpoint); sizes and bounds are.
"""
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple, Union

import torch

__all__ = ['TensorBundle', 'TensorBundleError', 'read_tensor_bundle', 'resolve_checkpoint_prefix']

TABLE_MAGIC = 0xdb4775248b80fb57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5
COMPRESSION_NAMES = {0: 'none', 1: 'snappy'}

# tensorflow/core/framework/types.proto DataType -> torch dtype (the numeric ones checkpoints hold)
TF_DTYPES = {
    1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8, 5: torch.int16, 6: torch.int8,
    9: torch.int64, 10: torch.bool, 14: torch.bfloat16, 17: torch.uint16, 19: torch.float16,
    22: torch.uint32, 23: torch.uint64,
}
TF_DTYPE_NAMES = {7: 'string', 8: 'complex64', 18: 'complex128', 20: 'resource', 21: 'variant'}


class TensorBundleError(ValueError):
    """A file that is not a TensorFlow checkpoint, or one this reader cannot read."""


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives (``BundleEntryProto``)."""
    dtype: int
    shape: Tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    num_slices: int


# ---------------------------------------------------------------- protocol buffer wire format

def read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(data):
            raise TensorBundleError('truncated varint')
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7f) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TensorBundleError('varint longer than 64 bits')


def proto_fields(data: bytes) -> Iterator[Tuple[int, int, Union[int, bytes]]]:
    """(field number, wire type, value) of a serialized message; varints and fixed ints as ints,
    length-delimited fields as bytes."""
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = read_varint(data, pos)
        elif wire_type == 1:
            value, pos = struct.unpack_from('<Q', data, pos)[0], pos + 8
        elif wire_type == 2:
            length, pos = read_varint(data, pos)
            if pos + length > len(data):
                raise TensorBundleError('truncated length-delimited field')
            value, pos = data[pos:pos + length], pos + length
        elif wire_type == 5:
            value, pos = struct.unpack_from('<I', data, pos)[0], pos + 4
        else:
            raise TensorBundleError(f'unsupported protobuf wire type {wire_type}')
        yield field, wire_type, value


def parse_shape(data: bytes) -> Tuple[int, ...]:
    """``TensorShapeProto``: repeated ``dim`` (2) of ``{size (1), name (2)}``; ``unknown_rank`` (3)."""
    dims: List[int] = []
    for field, _, value in proto_fields(data):
        if field == 2:
            size = 0
            for dim_field, _, dim_value in proto_fields(value):
                if dim_field == 1:
                    size = dim_value - (1 << 64) if dim_value >= 1 << 63 else dim_value
            dims.append(size)
        elif field == 3 and value:
            raise TensorBundleError('a tensor of unknown rank')
    return tuple(dims)


def parse_entry(data: bytes) -> BundleEntry:
    """``BundleEntryProto``: dtype (1), shape (2), shard_id (3), offset (4), size (5), crc32c (6), slices (7)."""
    values = {'dtype': 0, 'shape': (), 'shard_id': 0, 'offset': 0, 'size': 0, 'num_slices': 0}
    for field, _, value in proto_fields(data):
        if field == 1:
            values['dtype'] = value
        elif field == 2:
            values['shape'] = parse_shape(value)
        elif field == 3:
            values['shard_id'] = value
        elif field == 4:
            values['offset'] = value
        elif field == 5:
            values['size'] = value
        elif field == 7:
            values['num_slices'] += 1
    return BundleEntry(**values)


def parse_header(data: bytes) -> Tuple[int, int]:
    """``BundleHeaderProto``: (num_shards (1), endianness (2): 0 little, 1 big)."""
    num_shards, endianness = 1, 0
    for field, _, value in proto_fields(data):
        if field == 1:
            num_shards = value
        elif field == 2:
            endianness = value
    return num_shards, endianness


# ---------------------------------------------------------------- sorted string table

def read_block(table: bytes, handle: Tuple[int, int], what: str) -> bytes:
    offset, size = handle
    if offset + size + BLOCK_TRAILER_SIZE > len(table):
        raise TensorBundleError(f'the {what} block at {offset} (+{size} bytes) runs past the end of the index file')
    compression = table[offset + size]
    if compression != 0:
        raise TensorBundleError(
            f'the {what} block is {COMPRESSION_NAMES.get(compression, f"type-{compression}")}-compressed; '
            f'TensorFlow writes checkpoint indexes uncompressed, so this file was written by something else')
    return table[offset:offset + size]


def block_entries(block: bytes) -> Iterator[Tuple[bytes, bytes]]:
    """The (key, value) pairs of a block: prefix-compressed entries, then the restart offsets
    (uint32 each) and their count (uint32)."""
    if len(block) < 4:
        raise TensorBundleError('a table block shorter than its restart count')
    num_restarts = struct.unpack_from('<I', block, len(block) - 4)[0]
    end = len(block) - 4 * (num_restarts + 1)
    if end < 0:
        raise TensorBundleError('a table block with more restart points than bytes')
    pos, key = 0, b''
    while pos < end:
        shared, pos = read_varint(block, pos)
        unshared, pos = read_varint(block, pos)
        value_length, pos = read_varint(block, pos)
        if shared > len(key) or pos + unshared + value_length > end:
            raise TensorBundleError('a corrupt table entry')
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + value_length]
        pos += value_length


def read_handle(data: bytes, pos: int = 0) -> Tuple[Tuple[int, int], int]:
    offset, pos = read_varint(data, pos)
    size, pos = read_varint(data, pos)
    return (offset, size), pos


def table_entries(table: bytes) -> Iterator[Tuple[bytes, bytes]]:
    """Every (key, value) of a table file, in key order."""
    if len(table) < FOOTER_SIZE:
        raise TensorBundleError(f'{len(table)} bytes is too short for a checkpoint index')
    footer = table[-FOOTER_SIZE:]
    if struct.unpack_from('<Q', footer, FOOTER_SIZE - 8)[0] != TABLE_MAGIC:
        raise TensorBundleError('the index file does not end with the table magic number')
    _, pos = read_handle(footer)  # the metaindex block: empty in checkpoints
    index_handle, _ = read_handle(footer, pos)
    for _, handle in block_entries(read_block(table, index_handle, 'index')):
        yield from block_entries(read_block(table, read_handle(handle)[0], 'data'))


# ---------------------------------------------------------------- checkpoints

def resolve_checkpoint_prefix(path: Union[str, os.PathLike]) -> Path:
    """The checkpoint prefix of ``path``: the prefix itself, its ``.index`` file, one of its data files,
    or a directory (its ``checkpoint`` file's ``model_checkpoint_path``, else its only ``.index`` file)."""
    path = Path(path)
    if path.is_dir():
        state = path / 'checkpoint'
        if state.is_file():
            for line in state.read_text().splitlines():
                if line.startswith('model_checkpoint_path:'):
                    name = line.split(':', 1)[1].strip().strip('"')
                    return Path(name) if os.path.isabs(name) else path / name
        indexes = sorted(path.glob('*.index'))
        if len(indexes) != 1:
            raise TensorBundleError(
                f'{path} holds {len(indexes)} checkpoint indexes ({[p.name for p in indexes]}) and no '
                f'"checkpoint" file naming one; pass the prefix of the one to read (PATH/model.ckpt-NNNN)')
        return indexes[0].with_suffix('')
    if path.suffix == '.index':
        return path.with_suffix('')
    if '.data-' in path.name:
        return path.with_name(path.name[:path.name.rindex('.data-')])
    return path


class TensorBundle:
    """The tensors of a TensorFlow checkpoint, read lazily by name.

    Args:
        path: The checkpoint prefix (``.../model.ckpt-12345``), its ``.index`` file or its directory.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.prefix = resolve_checkpoint_prefix(path)
        index = Path(f'{self.prefix}.index')
        if not index.is_file():
            raise TensorBundleError(
                f'no TensorFlow checkpoint index at {index}; a checkpoint is PREFIX.index plus PREFIX.data-* files '
                f'(unpack the downloaded archive first)')
        self.entries: Dict[str, BundleEntry] = {}
        self.num_shards = 1
        try:
            for key, value in table_entries(index.read_bytes()):
                if key == b'':
                    self.num_shards, endianness = parse_header(value)
                    if endianness != 0:
                        raise TensorBundleError('a big-endian checkpoint')
                else:
                    self.entries[key.decode('utf-8')] = parse_entry(value)
        except TensorBundleError as error:
            raise TensorBundleError(f'{index}: {error}') from None
        self._shards: Dict[int, bytes] = {}

    def keys(self) -> List[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def shard_path(self, shard_id: int) -> Path:
        return Path(f'{self.prefix}.data-{shard_id:05d}-of-{self.num_shards:05d}')

    def _shard(self, shard_id: int) -> bytes:
        if shard_id not in self._shards:
            path = self.shard_path(shard_id)
            if not path.is_file():
                raise TensorBundleError(f'the checkpoint data file {path} is missing')
            self._shards[shard_id] = path.read_bytes()
        return self._shards[shard_id]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a torch tensor of its dtype and shape."""
        if name not in self.entries:
            raise KeyError(f'{name!r} is not in the checkpoint {self.prefix} ({len(self.entries)} tensors)')
        entry = self.entries[name]
        if entry.num_slices:
            raise TensorBundleError(f'{name} is stored in {entry.num_slices} slices (a partitioned variable); '
                                    f'this reader takes whole tensors only')
        if entry.dtype not in TF_DTYPES:
            raise TensorBundleError(
                f'{name} has TF dtype {TF_DTYPE_NAMES.get(entry.dtype, entry.dtype)}, not a numeric tensor')
        dtype = TF_DTYPES[entry.dtype]
        numel = 1
        for dim in entry.shape:
            numel *= dim
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if entry.size != expected:
            raise TensorBundleError(f'{name}: {entry.size} bytes stored for shape {list(entry.shape)} of {dtype} '
                                    f'({expected} expected)')
        data = self._shard(entry.shard_id)
        if entry.offset + entry.size > len(data):
            raise TensorBundleError(f'{name}: its bytes run past the end of {self.shard_path(entry.shard_id)} '
                                    f'(a truncated download?)')
        if numel == 0:
            return torch.empty(entry.shape, dtype=dtype)
        raw = bytearray(data[entry.offset:entry.offset + entry.size])
        return torch.frombuffer(raw, dtype=dtype).reshape(entry.shape)


def read_tensor_bundle(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Every numeric tensor of a TensorFlow checkpoint, by name."""
    bundle = TensorBundle(path)
    return {name: bundle.read(name) for name, entry in bundle.entries.items() if entry.dtype in TF_DTYPES}
