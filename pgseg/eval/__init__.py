"""Zero-shot evaluation: inference rules (``inference``), protocols and prompt templates, dataset readers and their
preparation (``datasets``, ``classes``, ``prepare``), metrics, the evaluation loops (``segmentation``, ``imagenet``),
the ``Segmenter`` API, diagnostics and visualisation."""
