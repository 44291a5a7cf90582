"""Corpora in, token files out: sources (inputs and built-in corpora), `prepare`, and
the memory-mapped dataset the trainer and evaluator read."""

from samout.data.dataset import TokenData
from samout.data.prepare import prepare
from samout.data.sources import BUILTIN_CORPORA, Document, load_documents

__all__ = ["BUILTIN_CORPORA", "Document", "TokenData", "load_documents", "prepare"]
