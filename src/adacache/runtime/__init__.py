"""The stateful runtime: programs per input signature, sessions per request."""

from .module import CachedModule
from .program import Program, build_program
from .session import Session
from .stats import SessionStats

__all__ = ["CachedModule", "Program", "Session", "SessionStats", "build_program"]
