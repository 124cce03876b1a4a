"""Forge: institutional memory with an event backbone."""
