"""MVP-SEG (Guo et al., arXiv 2304.06957): multi-view prompt learning on a frozen dense-feature backbone, with
OCLoss and Global Prompt Refining, trained on seen classes and evaluated over seen and unseen ones (hIoU); and
MVP-SEG+, its knowledge-transfer stage (a DeepLab student taught by the learned prompts, then self-trained).

    pgseg-prompt-train --config configs/mvpseg_synthetic.yaml          # learn prompts
    pgseg-eval --prompts runs/mvpseg/prompts.pt --dataset voc20 ...     # evaluate them
    pgseg-segment photo.jpg --prompts runs/mvpseg/prompts.pt --classes "cat,dog"
    pgseg-transfer --config configs/mvpseg_plus_synthetic.yaml          # MVP-SEG+: a student from the prompts
    pgseg-eval --student runs/mvpseg_plus/student.pt --dataset voc20    # evaluate it

What the core commands use of MVP-SEG is this package's interface: ``load_prompt_classifier``, ``SlideSettings``,
``evaluate_seen_unseen``, ``resolve_unseen`` and ``PromptSegmenter``; of MVP-SEG+, ``load_student``,
``retarget_student``, ``predict_student``, ``evaluate_predictions`` and ``StudentSegmenter``; ``build_backbone``
and ``DENSE_RULES`` for the training-free CLIP evaluation (``pgseg-eval --clip``).
"""
from .backbones import (
    DENSE_RULES,
    BackboneConfig,
    ClipDenseBackbone,
    DenseBackbone,
    GroupSegDenseBackbone,
    build_backbone,
)
from .inference import SlideSettings, evaluate_predictions, evaluate_seen_unseen, predict_student
from .learner import (
    MultiViewPrompts,
    PixelLogits,
    PromptConfig,
    TemplateClassifier,
    orthogonality_loss,
    presence_loss,
    refined_log_probs,
    segmentation_loss,
)
from .prompt_file import load_prompt_classifier, load_prompts, save_prompts
from .segmenter import PromptSegmenter, StudentSegmenter
from .splits import SPLITS, harmonic_iou, resolve_split, resolve_unseen, seen_unseen_metrics
from .student import Student, StudentConfig, load_student, retarget_student

__all__ = ['DENSE_RULES', 'BackboneConfig', 'DenseBackbone', 'ClipDenseBackbone', 'GroupSegDenseBackbone',
           'build_backbone', 'PromptConfig', 'MultiViewPrompts', 'TemplateClassifier', 'PixelLogits',
           'orthogonality_loss', 'segmentation_loss', 'presence_loss', 'refined_log_probs', 'load_prompts',
           'save_prompts', 'SPLITS', 'harmonic_iou', 'resolve_split', 'resolve_unseen', 'seen_unseen_metrics',
           'load_prompt_classifier', 'SlideSettings', 'evaluate_seen_unseen', 'PromptSegmenter', 'StudentConfig',
           'Student', 'load_student', 'retarget_student', 'predict_student', 'evaluate_predictions', 'StudentSegmenter']
