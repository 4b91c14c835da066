"""Install the MABN monorepo: the ``mabn`` core library, the ``cls`` and ``det`` apps, and the
``benchmarks`` and ``reproduction`` tools (outside the core package)."""
from setuptools import find_packages, setup

CORE = ["torch>=2.4", "torchvision>=0.19"]
CLS = ["yacs", "opencv-python-headless", "tensorboard", "tqdm", "matplotlib", "pyyaml"]
DET = ["yacs", "pycocotools", "opencv-python-headless", "tensorboard", "tqdm", "matplotlib", "pyyaml"]
DEV = ["pytest", "pytest-timeout", "pytest-randomly", "onnx", "onnxscript", "timm"]

setup(
    name="mabn",
    version="0.1.0",
    description="Moving Average Batch Normalization (Yan et al., ICLR 2020) and small-batch training",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["mabn", "mabn.*", "cls", "cls.*", "det", "det.*", "benchmarks", "benchmarks.*",
                                    "reproduction", "reproduction.*"]),
    install_requires=CORE,
    extras_require={
        "cls": CLS,
        "det": DET,
        "dev": DEV,
        "all": sorted(set(CLS + DET + DEV)),
    },
    license="MIT",
)
