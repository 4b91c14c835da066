"""The runtime every trainer shares (``cls``, ``det``), in the manner of timm's ``timm/utils``:
user errors and exit codes (``errors``), process groups (``distributed``), finite-checked atomic
checkpoints loaded with ``weights_only=True`` (``checkpoint``), the run log (``run_log``), SIGTERM
and SIGINT (``signals``), the output-folder lock (``lock``), mixed precision (``amp``) and the
training loop with hooks (``train_loop``). Trainer extras (tensorboard, tqdm, numpy) are imported
lazily, so ``import mabn`` needs torch alone."""
