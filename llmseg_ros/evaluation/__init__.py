"""ReasonSeg metrics (gIoU, cIoU, ncIoU) and evaluation runs.

* :mod:`~llmseg_ros.evaluation.metrics` — per-sample I / U and the split metrics;
* :mod:`~llmseg_ros.evaluation.report` — the loop over samples, records, overlays, tables;
* :mod:`~llmseg_ros.evaluation.settings` — what a run needs (``EvalSettings``, ``CompareRow``);
* :mod:`~llmseg_ros.evaluation.datasets` — the reader of one split;
* :mod:`~llmseg_ros.evaluation.predictors` — saved masks or a segmenter as a predictor;
* :mod:`~llmseg_ros.evaluation.runner` — :func:`~llmseg_ros.evaluation.runner.evaluate_split`
  (a predictor on a split) and ``training/evaluate.py``'s report and comparison runs;
* :mod:`~llmseg_ros.evaluation.writers` — ``report.*``, ``comparison.*`` and overlay files.
"""
