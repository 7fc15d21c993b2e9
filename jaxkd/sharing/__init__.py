"""Parameter sharing: weight clustering, similarity merging of neurons, cross-layer tying.

One concept per module:

- :mod:`~jaxkd.sharing.cluster`: the weights of a layer share ``k`` trained values (Han,
  Mao & Dally 2016), an optax wrapper like :func:`jaxkd.pruning.masked`;
- :mod:`~jaxkd.sharing.merge`: similar neurons fold into one and the layer shrinks
  (Srinivas & Babu 2015);
- :mod:`~jaxkd.sharing.tie`: several layers share one copy of their weights (ALBERT).
"""

from jaxkd.sharing.cluster import (
    ClusterState,
    centroid_gradients,
    cluster,
    clustered_weights,
    extract_codebook,
    find_cluster_state,
    init_clusters,
    init_codebook,
    lloyd,
    materialize,
    reassign,
    select_layers,
    unique_values,
)
from jaxkd.sharing.merge import merge_layers, merge_similar_neurons
from jaxkd.sharing.tie import tie_params, unique_param_count, untie

__all__ = [
    "ClusterState", "centroid_gradients", "cluster", "clustered_weights", "extract_codebook",
    "find_cluster_state", "init_clusters", "init_codebook", "lloyd",
    "materialize", "merge_layers", "merge_similar_neurons", "reassign", "select_layers",
    "tie_params", "unique_param_count", "unique_values", "untie",
]
