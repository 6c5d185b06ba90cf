from pathlib import Path

from setuptools import find_packages, setup

requirements = [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith("pytest")]

setup(
    name="llama",
    version="0.1.0",
    description="A from-scratch Llama inference engine that loads Meta's checkpoints as they are",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama": ["kernels.c"]},  # compiled on first use (llama/kernels.py)
    python_requires=">=3.9",
    install_requires=requirements,
    extras_require={"test": ["pytest"]},
)
