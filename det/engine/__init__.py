"""Training, inference and evaluation around the detector (``tools/train_net.py``,
``tools/test_net.py``), and the single-image predictor."""
