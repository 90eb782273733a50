# Metadata lives in setup.cfg; this shim keeps `pip install -e .` working with
# setuptools < 80 (which mmengine's pkg_resources use requires).
from setuptools import setup

setup()
