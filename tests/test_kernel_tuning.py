"""What the neighborhood kernels' autotuning is keyed on, and forcing one of its configs."""
import sys
from pathlib import Path

from attnzoo.kernels import _neighborhood_triton as nt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tools'))
from benchlib import gpucheck  # noqa: E402


def test_tuning_is_keyed_on_the_size_class_not_the_exact_size():
    for kernel in nt.TUNED_KERNELS.values():
        assert 'size_class' in kernel.keys and not {'height', 'width', 'heads'} & set(kernel.keys)
    same = nt.size_class(2, 2, 50, 76, (1, 1))
    assert nt.size_class(2, 2, 48, 72, (1, 1)) == same             # a detector's next input size: tuned already
    assert nt.size_class(2, 2, 100, 152, (1, 1)) != same            # twice the map: another tile may fit better
    assert nt.size_class(2, 2, 50, 76, (2, 2)) != same              # dilation groups are smaller maps
    assert nt.size_class(64, 2, 50, 76, (1, 1)) != same             # many more programs in flight
    # gpu_check's first-call rows rely on this: their first two sizes share a class
    for sizes in (gpucheck.NEW_SIZES, gpucheck.DRY_NEW_SIZES):
        assert nt.size_class(2, 2, *sizes[0], (1, 1)) == nt.size_class(2, 2, *sizes[1], (1, 1))


def test_forced_config_runs_only_that_config_and_restores_the_tuner():
    before = {name: list(kernel.configs) for name, kernel in nt.TUNED_KERNELS.items()}
    config = nt.TILE_CONFIGS[-1]
    with nt.forced_config(config):
        assert all(kernel.configs == [config] for kernel in nt.TUNED_KERNELS.values())
    assert {name: list(kernel.configs) for name, kernel in nt.TUNED_KERNELS.items()} == before
    assert len(nt.TILE_CONFIGS) == 24 and len({str(c) for c in nt.TILE_CONFIGS}) == 24
