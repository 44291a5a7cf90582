"""Importers of models published in other formats (`samout convert ...`)."""
