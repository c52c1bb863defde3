"""GLoRA's choice space, supernet sampling and evolutionary structure search (see :mod:`.glora_space`,
:mod:`.supernet`, :mod:`.evolution` and, for SD3 / Flux, :mod:`.flow_fitness`)."""

from .evolution import DenoisingFitness, LayerSpace, SearchResult, evolutionary_search, search_glora, search_supernet
from .flow_fitness import FlowMatchingFitness
from .glora_space import GLoRAChoiceSpace, sample_layer_config
from .supernet import (
    fixed_glora_config,
    get_subnet,
    is_glora_supernet,
    sample_subnet,
    save_subnet,
    set_subnet,
    subnet_parameter_count,
    subnet_spaces,
    supernet_layers,
)

__all__ = [
    "DenoisingFitness",
    "FlowMatchingFitness",
    "GLoRAChoiceSpace",
    "LayerSpace",
    "SearchResult",
    "evolutionary_search",
    "fixed_glora_config",
    "get_subnet",
    "is_glora_supernet",
    "sample_layer_config",
    "sample_subnet",
    "save_subnet",
    "search_glora",
    "search_supernet",
    "set_subnet",
    "subnet_parameter_count",
    "subnet_spaces",
    "supernet_layers",
]
