"""Build script: metadata lives in pyproject.toml; this file only adds the optional CUDA extension."""
from setuptools import setup

setup()
