"""Dense prediction over seen and unseen classes, and its seen / unseen evaluation.

A prompt classifier (learned prompts or hand-written templates): mmcv-style rescale, sliding windows batched through
the frozen backbone, refined log-probabilities averaged where windows overlap, bilinear resize to the original size,
argmax over every class. An MVP-SEG+ student: the same rescale, the whole image at once (MaskCLIP+'s test mode:
single scale, no flip)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..eval.datasets import SegmentationDataset
from ..eval.inference import rescale_image, rgb_array, slide_windows
from ..eval.metrics import confusion_matrix
from ..runtime.distributed import all_reduce_sum, get_rank, get_world_size, is_main_process
from .backbones import DenseBackbone
from .learner import refined_log_probs
from .splits import seen_unseen_metrics

__all__ = ['SlideSettings', 'predict_image', 'predict_student', 'evaluate_predictions', 'evaluate_seen_unseen']


@dataclass
class SlideSettings:
    short_side: int = 512  # MaskCLIP+: test short side 512 (Context: 520), long side at most 2048
    long_side: int = 2048
    crop_size: int = 512
    stride: int = 341
    batch_windows: int = 16

    @classmethod
    def from_prompts(cls, meta: dict, short_side: int | None = None, crop_size: int | None = None,
                     stride: int | None = None) -> SlideSettings:
        """The settings a prompts.pt was trained and evaluated with (its ``meta['slide']``), each replaced by an
        explicit value that is not None; the class defaults where the file has none."""
        slide = meta.get('slide') or {}
        given = {'short_side': short_side, 'crop_size': crop_size, 'stride': stride}
        return cls(**{k: v if v is not None else slide.get(k, getattr(cls, k)) for k, v in given.items()})


@torch.no_grad()
def predict_image(backbone: DenseBackbone, classifier, text: torch.Tensor, image, settings: SlideSettings,
                  device: torch.device | str = 'cpu', autocast_dtype: torch.dtype | None = None,
                  size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One RGB image -> (labels [H, W] over the classes of ``text``, log-probabilities [C, H, W]), at the image's
    size or at ``size`` (H, W)."""
    arr = rgb_array(image)
    x = backbone.normalize(rescale_image(arr, settings.short_side, settings.long_side).to(device) / 255.0)
    S = settings.crop_size
    _, _, H, W = x.shape
    ph, pw = max(S - H, 0), max(S - W, 0)
    x = F.pad(x, (0, pw, 0, ph))  # zeros = the mean colour after normalisation
    boxes = slide_windows(x.shape[2], x.shape[3], S, settings.stride)  # the zero-shot rule's windows
    total = torch.zeros(text.shape[1], x.shape[2], x.shape[3], device=device)
    count = torch.zeros(1, x.shape[2], x.shape[3], device=device)
    for i in range(0, len(boxes), settings.batch_windows):
        chunk = boxes[i:i + settings.batch_windows]
        crops = torch.cat([x[:, :, r0:r1, c0:c1] for (r0, r1), (c0, c1) in chunk])
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = classifier(backbone.dense_features(crops), text)
        log_probs = refined_log_probs(logits, size=(S, S))
        for lp, ((r0, r1), (c0, c1)) in zip(log_probs, chunk):
            total[:, r0:r1, c0:c1] += lp
            count[:, r0:r1, c0:c1] += 1
    scores = (total / count)[:, :H, :W]
    scores = F.interpolate(scores[None], size=tuple(size or arr.shape[:2]), mode='bilinear', align_corners=False)[0]
    return scores.argmax(dim=0), scores


@torch.no_grad()
def predict_student(student, image, short_side: int = 512, long_side: int = 2048, device: torch.device | str = 'cpu',
                    autocast_dtype: torch.dtype | None = None, size: tuple[int, int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One RGB image -> (labels [H, W] over the student's classes, logits [C, H, W]), at the image's size or at
    ``size`` (H, W): rescaled as the prompt classifier's input, the whole image through the student."""
    arr = rgb_array(image)
    x = rescale_image(arr, short_side, long_side).to(device) / 255.0
    with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        logits = student(x)
    scores = F.interpolate(logits.float(), size=tuple(size or arr.shape[:2]), mode='bilinear',
                           align_corners=False)[0]
    return scores.argmax(dim=0), scores


@torch.no_grad()
def evaluate_predictions(predict, dataset: SegmentationDataset, unseen: list[int], limit: int | None = None,
                         progress: bool = True, desc: str = '') -> dict:
    """``predict(image) -> labels [H, W]`` over all the dataset's classes, on every image; dataset-level IoU;
    mIoU(S), mIoU(U), hIoU. Under torchrun each rank takes images rank, rank + W, ... and the confusion matrices
    are summed."""
    names = list(dataset.classes)
    conf = torch.zeros(len(names), len(names), dtype=torch.int64)
    indices = list(range(len(dataset)))[:limit][get_rank()::get_world_size()]
    for i in tqdm(indices, desc=desc or dataset.spec.name, disable=not (progress and is_main_process()), unit='img',
                  dynamic_ncols=True):
        image, label, _ = dataset[i]
        conf += confusion_matrix(predict(image).cpu(), label, len(names))
    conf = all_reduce_sum(conf)
    out = seen_unseen_metrics(conf, names, unseen)
    out.update(dataset=dataset.spec.name, split=dataset.split, num_images=len(list(range(len(dataset)))[:limit]))
    return out


@torch.no_grad()
def evaluate_seen_unseen(backbone: DenseBackbone, classifier, dataset: SegmentationDataset, unseen: list[int],
                         settings: SlideSettings, device: torch.device | str = 'cpu',
                         autocast_dtype: torch.dtype | None = None, limit: int | None = None,
                         progress: bool = True, desc: str = '') -> dict:
    """:func:`evaluate_predictions` of a prompt classifier (learned prompts or templates) with sliding windows."""
    text = classifier.class_embeddings(backbone, list(dataset.classes))
    return evaluate_predictions(
        lambda image: predict_image(backbone, classifier, text, image, settings, device, autocast_dtype)[0],
        dataset, unseen, limit, progress, desc)
