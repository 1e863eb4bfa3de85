"""Checks that run a backward inside a child process (tests/test_faults.py): a child *spawned* fresh, since
autograd refuses to run in a child forked from a process whose autograd engine has started its threads
(any earlier backward in the test session). Kept apart from the test module so the child imports little."""
import traceback

import torch

from attnzoo.backbones import litv2


def report_to(connection, check, args):
    """The child's side: runs ``check(*args)`` and sends back '' or the traceback of its failure."""
    try:
        check(*args)
        connection.send('')
    except BaseException:
        connection.send(traceback.format_exc()[-32768:])


def check_deform_conv_nonfinite_offsets(x, weight, bias):
    offset = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    offset[1, 0, 0, 0], offset[1, 3, 2, 1], offset[1, 6, 3, 3] = float('nan'), float('inf'), float('-inf')
    offset.requires_grad_()
    out = litv2.deform_conv2d_v1(x, offset, weight, bias, 2, 0)
    out.sum().backward()
    alone = litv2.deform_conv2d_v1(x[:1], offset[:1].detach(), weight, bias, 2, 0)
    assert torch.equal(out[0], alone[0]), 'non-finite offsets in sample 1 changed sample 0'
    nonfinite = torch.zeros(4, 4, dtype=torch.bool)
    nonfinite[0, 0] = nonfinite[2, 1] = nonfinite[3, 3] = True
    assert out[1][:, nonfinite].isnan().all(), 'a position with a non-finite offset must be NaN'
    assert torch.isfinite(out[1][:, ~nonfinite]).all(), 'positions with finite offsets must stay finite'
    assert torch.isfinite(offset.grad[0]).all()


def check_train_step_with_nan(model, x):
    x = x.clone()
    x[1, :, 5, 7] = float('nan')
    out = model.train()(x)
    assert not torch.isfinite(out).all(), 'a non-finite input gave an all-finite output'
    out.sum().backward()
