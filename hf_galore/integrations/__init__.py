"""Integrations with transformers (the only package that touches its internals)."""

from .transformers import is_registered, optimizer_cls_and_kwargs, register, unregister

__all__ = ["is_registered", "optimizer_cls_and_kwargs", "register", "unregister"]
