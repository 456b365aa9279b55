"""Data: tokenisation (light, always importable); the webdataset pipeline lives in its own module."""
from .text import tokenize

__all__ = ['tokenize']
