"""Networks: the MiT backbone, AFA's heads and network, PSA's AffinityNet, and weight loaders."""
from afa.models.heads import AttentionAffinity, SegFormerHead
from afa.models.mit import MIT_VARIANTS, MixTransformer, build_mit
from afa.models.network import AFANetwork, AFAOutput, build_afa_network, parameter_groups
from afa.models.psa import AffinityFeatureHead, AffinityNet, build_affinity_net
from afa.models.weights import (
    CheckpointError,
    load_afa_reference,
    load_pretrained_encoder,
    load_strict,
    read_state_dict,
)

__all__ = [
    "AFANetwork", "AFAOutput", "AffinityFeatureHead", "AffinityNet", "AttentionAffinity", "CheckpointError",
    "MIT_VARIANTS", "MixTransformer", "SegFormerHead", "build_afa_network", "build_affinity_net", "build_mit",
    "load_afa_reference", "load_pretrained_encoder", "load_strict", "parameter_groups", "read_state_dict",
]
