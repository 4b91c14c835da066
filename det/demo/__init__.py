"""Demo scripts (run as ``python det/demo/predict.py`` or ``python -m det.demo.predict``)."""
