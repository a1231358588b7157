"""Packaging for modeling_segcompass.

Install torch first (``pip install torch==2.13.0`` on the CPU machines of this project):
the range below is satisfied by that build, so pip does not replace it with a CUDA one.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

CORE = [
    "torch>=2.6",
    "transformers>=5.23,<6",
    "safetensors>=0.4",
    "huggingface-hub>=1.0",
    "numpy>=1.26",
    "pillow>=10",
    "tqdm>=4.66",
]
TRAIN = [
    "accelerate>=1.10",
    # PEFT's own API (inject_adapter_in_model, PeftModel with the heads as modules_to_save):
    # older releases do not import under transformers 5 (0.17) or cannot wrap a head that is
    # called with keyword arguments (0.18, 0.19). transformers' add_adapter / load_adapter,
    # which this package does not use, ask for peft >= 0.22 from transformers 5.24 on.
    "peft>=0.20",
    "trl>=1.16,<1.17",
    "datasets>=4.0",
    "evaluate>=0.4.5",
    "scipy>=1.13",
    "sentencepiece>=0.2",
    "tokenizers>=0.22",
]
DEMO = ["matplotlib>=3.9"]
SERVE = ["gradio>=5"]
# tensorboard: what the tests of `--report-to tensorboard` write to and read back.
DEV = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "ruff>=0.6", "tensorboard>=2.16"]

setup(
    name="modeling_segcompass",
    version="0.1.0",
    description=(
        "SegCompass (arXiv 2605.22658): interpretable reasoning segmentation with sparse "
        "autoencoders, as a Hugging Face Transformers model package."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_segcompass", "modeling_segcompass.*"]),
    install_requires=CORE,
    extras_require={
        "train": TRAIN,
        "demo": TRAIN + DEMO,
        "serve": SERVE,
        "dev": TRAIN + DEMO + SERVE + DEV,
        "all": TRAIN + DEMO + SERVE + DEV,
    },
    entry_points={"console_scripts": ["segcompass=modeling_segcompass.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
