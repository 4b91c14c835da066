"""The runtime every trainer shares (``cls``, ``det``): user errors, process groups, checkpoints,
run log, signals and the training loop. Trainer extras (tensorboard, tqdm, filelock) are
imported lazily, so ``import mabn`` needs torch alone."""
