"""Caching policies: what to reuse, where, and when."""

from .adacorrection import AdaCorrection
from .base import Policy, SitePlan, StepContext, policy_dataclass
from .first_block import FirstBlockCache
from .fora import FORA
from .nocache import NoCache
from .taylorseer import TaylorSeer
from .teacache import TeaCache
from .zcache import ZCache

__all__ = ["AdaCorrection", "FORA", "FirstBlockCache", "NoCache", "Policy", "SitePlan", "StepContext", "TaylorSeer", "TeaCache", "ZCache", "policy_dataclass"]
