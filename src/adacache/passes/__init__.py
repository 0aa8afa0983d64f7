"""Graph passes, each ``GraphModule -> GraphModule`` with one job.

Policies describe their cache sites in the words of :mod:`adacache.passes.contract`; the
passes import no policy. Order, in the spirit of PT2E quantization (annotate -> insert -> lower):

0. :func:`drop_noop_squeezes` replaces squeezes that remove nothing by their input, and
   :func:`spell_boolean_selects` spells selections between booleans with logic operators.
1. :func:`find_blocks` annotates the transformer blocks (``node.meta["adacache_region"]``).
2. :func:`outline_sites` cuts each cache site (a block, a span of blocks, or an
   attention / feed-forward call) out into a child module.
3. :func:`insert_cache_nodes` wraps each site in ``cache_load`` / ``offset_score`` /
   ``blend`` nodes and a ``cond``, with the cache state as explicit graph inputs/outputs.
4. :func:`require_finite_inputs` makes every site compute on a call whose inputs are not
   finite (a reused site would hide the NaN).
5. :func:`lower_cond_to_python` (eager) or nothing (``torch.compile``, ONNX) lowers it.
"""

from .contract import CacheLayout, SitePlan, StateSpec
from .find_blocks import find_blocks
from .finite_inputs import require_finite_inputs
from .insert_cache import insert_cache_nodes, outline_sites
from .lower import branch, lower_cond_to_python
from .outline import outline_region
from .regions import Region
from .bool_selects import spell_boolean_selects
from .shape_noops import drop_noop_squeezes

__all__ = [
    "CacheLayout",
    "Region",
    "SitePlan",
    "StateSpec",
    "branch",
    "drop_noop_squeezes",
    "spell_boolean_selects",
    "find_blocks",
    "insert_cache_nodes",
    "lower_cond_to_python",
    "outline_region",
    "outline_sites",
    "require_finite_inputs",
]
