"""``none``: the frozen pre-trained backbone; only the classifier learns (head only; with ``classifier: ncm`` this
is SimpleCIL, with ``classifier: ridge`` RanPAC without first-session adaptation)."""

from models.continual.base import ContinualMethod, register_method


@register_method("none")
class NoAdapter(ContinualMethod):
    """Nothing added to the backbone."""
