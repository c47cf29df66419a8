"""Build script. Metadata lives in pyproject.toml; this file only exists to drive native builds."""
from setuptools import setup

setup()
