"""ImageNet classification trainer for small normalization batches (BN / BRN / GN / SyncBN / MABN).

The application behind the ImageNet table of Yan et al., "Towards Stabilizing Batch Statistics
in Backward Propagation of Batch Normalization" (ICLR 2020): the SGD batch stays 32 per GPU
while the normalization batch ``--norm_batch`` is as small as 2. Entry point: ``cls/train.py``
(``python -m cls.train``); see ``docs/cls.md``.

Modules, one concern each:

* :mod:`cls.config`: flags, ``--config`` yaml files, validation;
* :mod:`cls.embedded_dataset`: the procedural dataset written once as ImageFolder PNGs;
* :mod:`cls.transforms`: the published OpenCV augmentation;
* :mod:`cls.data`: ImageFolder reading, per-rank samplers, data loaders;
* :mod:`cls.norms`: ``--norm`` / ``--norm_batch`` to ``mabn.get_norm`` calls;
* :mod:`cls.models`: ResNet-18/34/50/101 (torchvision's, with the chosen norm) and the CIFAR-style ResNet-20;
* :mod:`cls.metrics`: loss, top-k counts, meters;
* :mod:`cls.checkpoint`: what a checkpoint holds (published keys, per-rank buffers, RNG state);
* :mod:`cls.resume`: which changed flags a resume applies and which it refuses;
* :mod:`cls.bn_statistics`: ``--record_statistics`` (mu_B, sigma^2_B, g_B, Psi_B);
* :mod:`cls.statistics_plot`: the figures of ``scripts/plot_statistics.py``;
* :mod:`cls.export`: ``--export_folded``;
* :mod:`cls.run_log`: the published TRAIN/TEST line formats;
* :mod:`cls.engine`: the training step, evaluation and hooks on :class:`mabn.utils.train_loop.TrainerBase`;
* :mod:`cls.train`: ``main``.

Process groups, safe checkpoint I/O, the run log, signals, the folder lock and mixed precision come
from the shared runtime :mod:`mabn.utils`, which ``det`` uses too.
"""
