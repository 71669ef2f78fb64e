"""Converters from other checkpoint layouts into this project's format."""

from tokenpacker_llava.conversion.reference import convert_reference_checkpoint

__all__ = ["convert_reference_checkpoint"]
