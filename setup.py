# Placeholder until the CUDA extension build lands (issue 5): pure-Python install.
from setuptools import setup

setup()
