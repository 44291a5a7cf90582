"""Moved to samout.decoding.detokenizer (one detokenizer for generate, chat and the server)."""

from samout.decoding.detokenizer import StopMatcher, TextStream, stop_matcher

__all__ = ["StopMatcher", "TextStream", "stop_matcher"]
