"""timm's ``Beit`` (SimMIM, BEiT-v2): relative position bias, shared by all blocks or per block; timm builds it."""

from __future__ import annotations

from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from torch import Tensor, nn

from beyond_cls.models.architectures.attention import AttentionAdapter, Projected, fused_qkv
from beyond_cls.models.architectures.registry import Architecture, register_architecture

__all__ = ["SHARED_TABLE", "project_beit", "spread_shared_rel_pos_bias"]

#: The state-dict key of the relative position bias table shared by all blocks.
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def project_beit(module: BeitAttention, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Projected:
    """BEiT attention: fused qkv with q/v biases; the block's and the shared relative position bias."""
    q, k, v = fused_qkv(module, x)
    bias = None
    if module.relative_position_bias_table is not None:
        bias = module._get_rel_pos_bias()
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    return Projected(q, k, v, bias)


def spread_shared_rel_pos_bias(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Copy a shared BEiT bias table into every block when ``model`` has per-block tables instead.

    This is how BEiT's fine-tuning script loads pretrained weights; each block then adds the same bias
    the shared module would have added. Does nothing when the model has a shared table itself.
    """
    if SHARED_TABLE not in sd or getattr(model, "rel_pos_bias", None) is not None:
        return sd
    targets = [
        f"{name}.relative_position_bias_table"
        for name, module in model.named_modules()
        if isinstance(getattr(module, "relative_position_bias_table", None), Tensor)
    ]
    if not targets or any(t in sd for t in targets):
        return sd
    out = {k: v for k, v in sd.items() if k != SHARED_TABLE}
    out.update({t: sd[SHARED_TABLE] for t in targets})
    return out


register_architecture(
    Architecture(
        "beit",
        models=(Beit,),
        attention={BeitAttention: AttentionAdapter(project_beit)},
        timm_prefixes=("beitv2", "beit"),
        prepare_state_dict=spread_shared_rel_pos_bias,
    )
)
