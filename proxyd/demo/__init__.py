"""Tiny demo servers for trying proxyd by hand."""
