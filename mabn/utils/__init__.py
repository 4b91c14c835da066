"""The runtime every trainer shares (``cls``, ``det``), in the manner of timm's ``timm/utils``:
user errors and exit codes (``errors``), process groups (``distributed``), finite-checked atomic
checkpoints loaded with ``weights_only=True`` (``checkpoint``), the run log (``run_log``), SIGTERM
and SIGINT (``signals``), the output-folder lock (``lock``), mixed precision (``amp``), the
training loop with hooks (``train_loop``), the data pieces both trainers use (validation
shards, image decoding, generated datasets written once into the cache: ``data``) and yaml
config files that refuse a key given twice (``yaml_config``). Trainer extras (tensorboard, tqdm,
cv2, yaml) are imported lazily, so ``import mabn`` needs torch alone."""
