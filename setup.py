"""Packaging lives in setup.cfg; this file lets older tools and `pip install -e .` find it."""

from setuptools import setup

setup()
