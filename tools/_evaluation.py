"""Top-1 / top-5 accuracy of a model over a loader, summed over the processes of a torchrun launch."""
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from _runtime import DistInfo, ToolError


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, dist_info: DistInfo,
             autocast_dtype: Optional[torch.dtype], desc: str = 'eval', leave: bool = True) -> dict:
    """Top-1 and top-5 accuracy (percent) over all ranks' images; top-5 is top-k with k = the
    number of classes when there are fewer than five. ``nonfinite_images`` counts the images whose logits
    hold a NaN or an infinity (their ranking, and so the accuracy, means nothing)."""
    model.eval()
    device = dist_info.device
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images, non-finite ones
    for images, labels in tqdm(loader, desc=desc, disable=not dist_info.is_main, leave=leave, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(images)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        nonfinite = (~logits.isfinite()).flatten(1).any(dim=1).sum()
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device),
                               nonfinite])
    if dist_info.enabled:
        dist.all_reduce(counts)
    top1, top5, num_images, nonfinite_images = counts.tolist()
    if num_images == 0:
        raise ToolError('the evaluation split holds no images')
    return {'top1': 100.0 * top1 / num_images, 'top5': 100.0 * top5 / num_images, 'num_images': int(num_images),
            'nonfinite_images': int(nonfinite_images)}
