from setuptools import find_packages, setup

# Runtime pins live in requirements.txt (torch==2.13.0 is the CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build). install_requires only states ranges that
# the pinned set satisfies, so `pip install -e .` never replaces the pinned torch.
setup(
    name="ear-dist",
    version="0.1.0",
    description="Distributed concept erasure for autoregressive text-to-image models",
    packages=find_packages(include=["ear_dist", "ear_dist.*"]),
    # data files a non-editable install needs: the example configs (`--config church`), the recipes
    # (`--recipe preserving`), the DeepSpeed configs (`dist.deepspeed_config=zero2`) and the sbatch
    # templates (`ear-dist submit`)
    package_data={
        "ear_dist.config": ["examples/*.yaml", "recipes/*.yaml"],
        "ear_dist.distributed": ["ds_configs/*.json"],
        "ear_dist.slurm": ["templates/*.sbatch", "templates/common/*.sh"],
    },
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<=2.14.1",
        # 5.22.0: the first release that loads Janus-Pro's byte-level tokenizer (declared as
        # LlamaTokenizerFast) without dropping spaces and newlines in every load route
        "transformers>=5.22,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy",
        "pillow",
    ],
    extras_require={
        "dist": ["deepspeed>=0.19,<0.20", "mpi4py>=4"],
        "data": ["webdataset>=1.0", "datasets>=3"],
        "kernels": ["triton>=3.4"],
        "telemetry": ["tensorboard>=2.15", "nvidia-ml-py>=12"],
        "eval": ["nudenet==3.4.2"],
        "test": ["pytest>=8", "pytest-timeout>=2"],
    },
    entry_points={"console_scripts": ["ear-dist=ear_dist.cli:run"]},
)
