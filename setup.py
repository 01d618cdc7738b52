from setuptools import find_packages, setup

setup(
    name="palm-rlhf",
    version="0.1.0",
    description="A minimal, readable and fast PyTorch library for training language models with human feedback",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=("tests", "benchmarks")),
    python_requires=">=3.10",
    install_requires=[
        # torch >= 2.5 for torch.distributed.tensor (FSDP2); pin torch==2.13.0 yourself on a CPU-only machine (see README)
        "torch>=2.5",
        "einops>=0.7",
        "beartype",
        "accelerate>=0.30",
        "tqdm",
        "safetensors",
        "tokenizers>=0.19",  # BPE (palm_rlhf/tokenizer.py); imported only when a BPE is used
        "numpy",
    ],
    extras_require={
        "flash": ["flash-attn"],
        "plot": ["matplotlib"],
        # deepspeed and transformers for tests/test_deepspeed.py (Accelerate's DeepSpeed plugin imports transformers)
        "deepspeed": ["deepspeed==0.19.8", "transformers==5.24.0"],
        "test": ["pytest", "pytest-django==4.14.0", "matplotlib", "vaderSentiment==3.3.2", "deepspeed==0.19.8",
                 "transformers==5.24.0", "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
        "feedback": ["django==5.2.19", "waitress==3.0.2"],
    },
    package_data={"palm_rlhf.feedback": ["templates/feedback/*.html", "static/feedback/*"]},
    entry_points={"console_scripts": ["palm-rlhf-feedback=palm_rlhf.feedback.__main__:main"]},
)
