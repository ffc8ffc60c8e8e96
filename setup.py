"""switchx: Switch Transformers and sparse Mixture-of-Experts models in JAX/Flax.

Versions are pinned to releases tested together on CPU (Python 3.11); see docs/architecture.md.
"""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "gin-config==0.5.0",
    "numpy==2.4.6",
    "sentencepiece==0.2.3",   # tokenizers (the demo trains one on the built-in corpus)
    "matplotlib==3.11.2",     # loss curves and routing plots
    "tensorboardX==2.6.5",    # TensorBoard event files without TensorFlow
    "tqdm==4.70.1",           # progress bars
    "safetensors==0.8.0",     # switchx.save / switchx.load and transformers checkpoints
]

EXTRAS = {
    # tensorflow-datasets sources read without TensorFlow (array_record + tfds data sources / grain).
    "data": ["tensorflow-datasets==4.9.10", "grain==0.2.18", "array_record==0.8.6"],
    # transformers' PyTorch Switch / T5 for checkpoint conversion and parity tests (CPU torch build).
    "interop": ["torch==2.13.0", "transformers==5.24.0"],
    "notebooks": ["nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "hypothesis==6.170.17"],
}

setup(
    name="switchx",
    version="0.1.0",
    description="Switch Transformers and sparse Mixture-of-Experts models in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["switchx", "switchx.*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["switchx=switchx.cli:main"]},
)
