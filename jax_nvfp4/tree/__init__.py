"""prepare over a params pytree: finding MoE layers, gate/up fusion, TP order, sharding, marks."""
