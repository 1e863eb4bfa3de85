"""An mmengine hook that kills its own process (SIGKILL: no clean-up, as the OOM killer or a pre-empted
node does) after a given training iteration; imported by a test config's ``custom_imports``."""
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillAfterIteration(Hook):
    # before the checkpoint hook (priority VERY_LOW): the iteration it kills at is never saved
    priority = 'NORMAL'

    def __init__(self, iteration: int):
        self.iteration = iteration

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)
